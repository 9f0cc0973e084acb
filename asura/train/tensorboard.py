"""TensorBoard events, written synchronously at each log step (tensorboardX's event files).

tensorboardX's SummaryWriter writes from a daemon thread: when the disk fills, that thread dies
with a traceback on stderr and its bounded queue then blocks the trainer. Here each record is one
event written and flushed in the caller's thread, so a failed write is an OSError where the
trainer can report it in one line; records come every train.log_every steps, so the cost is small.

A resumed run starts a new event file with a SessionLog START at the first step it will log:
TensorBoard then drops the steps a killed run logged past its checkpoint, as metrics.jsonl does.

On gs:// (no append) the event file is written in a local temporary directory and uploaded whole
to `tb/` at most every `flush_s` seconds, at every checkpoint (`flush`) and at the end; TensorBoard
reads gs:// log directories through gcsfs.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar

from asura.storage.paths import is_remote, to_path, write_whole
from asura.storage.records import FLUSH_S


class TensorBoard:
    def __init__(self, logdir, resumed_from: int = 0, flush_s: float = FLUSH_S):
        self.logdir = to_path(logdir)
        self.remote = is_remote(self.logdir)
        self.flush_s, self.last_upload = flush_s, time.monotonic()
        if self.remote:
            self.staging = tempfile.mkdtemp(prefix="asura-tb-")
            local = Path(self.staging)
        else:
            local = Path(os.fspath(self.logdir))
            local.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(local / "events"))
        if resumed_from > 0:  # purge what a killed run logged after its last checkpoint
            self.writer.write_event(
                Event(wall_time=time.time(), step=resumed_from + 1, session_log=SessionLog(status=SessionLog.START))
            )
        self.writer.flush()

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One event with every finite number of the record as a scalar; OSError if the write fails."""
        values = []
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                values.extend(scalar(k, v).value)
        if not values:
            return
        event = Event(wall_time=time.time(), step=int(step))
        event.summary.value.extend(values)
        self.writer.write_event(event)
        self.writer.flush()
        if self.remote and time.monotonic() - self.last_upload >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """gs://: upload the event file whole (nothing to do locally: every write is flushed)."""
        self.last_upload = time.monotonic()
        if self.remote:
            local = Path(self.writer._file_name)  # tensorboardX names it: events.out.tfevents.<time>.<host>
            write_whole(self.logdir / local.name, local.read_bytes())

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            try:
                self.flush()
            finally:
                shutil.rmtree(self.staging, ignore_errors=True)
