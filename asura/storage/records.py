"""A run's metrics records (one JSON object per log or eval step): metrics.jsonl, on any workdir.

Locally `metrics.jsonl` is appended and flushed record by record (`tail -f` works). An object
store cannot append, so on gs:// records are buffered and written as whole objects,
`metrics/<first step>-<last step>-<time>.jsonl`, at most every `flush_s` seconds and at every
checkpoint (`flush`), each a complete file or absent. Read back (`read_records`) they are the
objects in name order (zero-padded steps, so step order), concatenated: the same list of records
a local run's metrics.jsonl holds.

On resume `truncate_records(workdir, step)` drops what a killed run logged past its last
checkpoint: locally the file is rewritten whole; on gs:// objects entirely past the step are
deleted and one that straddles it is rewritten with the records up to the step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from asura.storage.paths import files_under, is_remote, to_path, write_whole

LOCAL_FILE = "metrics.jsonl"
REMOTE_DIR = "metrics"
FLUSH_S = 30.0  # gs://: buffered records become an object at least this often (and at checkpoints)


def _lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a kill (local append)
            continue
    return out


def _dump(records: list[dict]) -> str:
    return "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)


def read_records(workdir) -> list[dict]:
    """Every record of a run, in order ([] when it has none)."""
    root = to_path(workdir)
    if not is_remote(root):
        path = root / LOCAL_FILE
        return _lines(path.read_text()) if path.exists() else []
    return [r for obj in files_under(root / REMOTE_DIR) if obj.suffix == ".jsonl" for r in _lines(obj.read_text())]


def truncate_records(workdir, max_step: int) -> None:
    """Drop the records past `max_step` (work a killed run did after its last checkpoint)."""
    root = to_path(workdir)
    if not is_remote(root):
        path = root / LOCAL_FILE
        if path.exists():
            records = _lines(path.read_text())
            kept = [r for r in records if r.get("step", 0) <= max_step]
            if len(kept) != len(records) or not path.read_text().endswith("\n"):
                write_whole(path, _dump(kept))
        return
    for obj in files_under(root / REMOTE_DIR):
        records = _lines(obj.read_text())
        kept = [r for r in records if r.get("step", 0) <= max_step]
        if not kept:
            obj.unlink()
        elif len(kept) != len(records):
            write_whole(obj, _dump(kept))


class RecordLog:
    """Where the trainer writes records (process 0 only)."""

    def __init__(self, workdir, flush_s: float = FLUSH_S):
        self.root = to_path(workdir)
        self.remote = is_remote(self.root)
        self.flush_s = flush_s
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.file = None if self.remote else open(os.fspath(self.root / LOCAL_FILE), "a")  # noqa: SIM115

    @property
    def name(self) -> str:
        return os.fspath(self.root / (REMOTE_DIR if self.remote else LOCAL_FILE))

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (locally at once; on gs:// when the buffer is flush_s old). OSError if a write fails."""
        if not self.remote:
            self.file.write(json.dumps(record, allow_nan=True) + "\n")
            self.file.flush()
            return
        self.pending.append(record)
        if time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """gs://: write the buffered records as one object (nothing to do locally)."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        first, last = self.pending[0]["step"], self.pending[-1]["step"]
        name = f"{int(first):010d}-{int(last):010d}-{time.time_ns()}.jsonl"
        write_whole(self.root / REMOTE_DIR / name, _dump(self.pending))
        self.pending = []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.file is not None:
                self.file.close()
