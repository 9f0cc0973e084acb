"""Metric sinks: metrics.jsonl, TensorBoard (tensorboardX), optional W&B, and a tqdm bar.

Only process 0 writes. Records are flat dicts of floats keyed like
``train/loss`` or ``eval/d3/exact_match``; every record carries ``step``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from asura.storage.paths import to_path
from asura.storage.records import RecordLog
from asura.train.checkpoint import SaveError, first_line
from asura.train.evaluate import SHOWN, shown_metrics, shown_values
from asura.train.tensorboard import TensorBoard


def to_python(x: Any) -> Any:
    """numpy/jax scalars and small arrays -> JSON-friendly floats/lists (NaN/Inf kept as floats)."""
    a = np.asarray(x)
    if a.ndim == 0:
        v = a.item()
        return float(v) if isinstance(v, float) or a.dtype.kind == "f" else v
    return [to_python(v) for v in a]


def flatten(prefix: str, metrics: dict) -> dict[str, Any]:
    """{'ce_per_iter': [a, b]} -> {'prefix/ce_per_iter/1': a, ...} (iterations are 1-based)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        v = to_python(v)
        if isinstance(v, list):
            for i, x in enumerate(v):
                out[f"{prefix}/{k}/{i + 1}"] = x
        else:
            out[f"{prefix}/{k}"] = v
    return out


def encode_pending(pending: list[dict]) -> list[dict]:
    """Per-step metrics not yet logged, as JSON for the checkpoint (NaN as null; float32 values are
    exact as JSON numbers, so a resumed window averages exactly what a straight run would)."""
    out = []
    for m in jax.device_get(pending):
        rec = {}
        for k, v in m.items():
            v = to_python(v)
            if isinstance(v, list):
                rec[k] = [None if isinstance(x, float) and math.isnan(x) else x for x in v]
            else:
                rec[k] = None if isinstance(v, float) and math.isnan(v) else v
        out.append(rec)
    return out


def decode_pending(records: list[dict]) -> list[dict]:
    """`encode_pending`'s inverse: float32 arrays again (what the train step returned)."""

    def arr(v):
        if isinstance(v, list):
            return np.asarray([np.nan if x is None else x for x in v], np.float32)
        return np.float32(np.nan) if v is None else np.asarray(v, np.float32 if isinstance(v, float) else None)

    return [{k: arr(v) for k, v in rec.items()} for rec in records]


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of one local metrics.jsonl file (a workdir's records on any storage: read_records)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _wandb_run(workdir: Path, cfg):
    """A W&B run named after the workdir (configs are shared by many runs), resumable: its id is
    stored in the workdir, so a resumed run continues the same W&B run. $ASURA_WANDB_GROUP
    (set by sweeps) groups the trials of one study."""
    import os
    import uuid

    import wandb  # optional dependency; preflight checks it is installed

    from asura.config import config_to_dict

    id_file = workdir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.train.wandb_project,
        name=workdir.resolve().name,
        id=run_id,
        resume="allow",
        group=os.environ.get("ASURA_WANDB_GROUP"),
        config=config_to_dict(cfg),
    )


class MetricsWriter:
    def __init__(self, workdir: Path, cfg, *, enabled: bool = True, total_steps: int = 0, initial_step: int = 0):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = RecordLog(workdir)
        if cfg.train.tensorboard:
            self.tb = TensorBoard(to_path(workdir) / "tb", resumed_from=initial_step)
        if cfg.train.wandb:
            self.wandb = _wandb_run(workdir, cfg)
        if cfg.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, file=sys.stderr)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time(), **record}
        try:
            self.jsonl.append(rec)
        except OSError as e:  # disk full: the checkpoints are intact; the log is truncated on resume
            raise SaveError(f"writing {self.jsonl.name} failed: {first_line(e)}") from None
        if self.tb is not None:
            try:
                self.tb.write(step, record)
            except OSError as e:
                raise SaveError(f"writing TensorBoard events in {self.tb.logdir} failed: {first_line(e)}") from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=step)

    def flush(self) -> None:
        """Make every record so far durable (gs:// buffers them): at each checkpoint."""
        if not self.enabled:
            return
        try:
            self.jsonl.flush()
            if self.tb is not None:
                self.tb.flush()
        except OSError as e:
            raise SaveError(f"writing the metrics log or TensorBoard events failed: {first_line(e)}") from None

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
        self.bar.refresh()

    def status(self, text: str | None) -> None:
        """Show what the run is doing between steps (compiling, evaluating) as the bar's prefix."""
        if self.bar is not None:
            self.bar.set_description_str(text or "", refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in (self.tb, self.jsonl):
            if sink is not None:
                with contextlib.suppress(OSError):  # a full disk was reported when the write failed
                    sink.close()
        if self.wandb is not None:
            self.wandb.finish()


def window_means(pending: list[dict]) -> dict[str, Any]:
    """Window means; per-iteration entries that never ran (NaN) are averaged over the steps that ran them."""
    host = jax.device_get(pending)
    out = {}
    for k in host[-1]:
        x = np.stack([np.asarray(m[k], np.float64) for m in host])
        if k == "ce_per_iter":
            ran = np.isfinite(x)
            out[k] = np.where(ran.any(0), np.where(ran, x, 0).sum(0) / np.maximum(ran.sum(0), 1), np.nan)
        else:
            out[k] = x.mean(0)
    return out


def _eval_at(ev: dict, prefix: str) -> dict[str, float]:
    """{ce, accuracy, exact_match, ...} of one depth from flat eval records (prefix 'eval/' or 'eval/d3/')."""
    return {k[len(prefix) :]: v for k, v in ev.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]}


def bar_fields(cfg, train: dict, ev: dict) -> dict[str, float]:
    """The progress bar: train ce, accuracy and lr, then the eval metrics that fit the data (no em on text)."""
    nan = float("nan")
    out = {"ce": train.get("train/ce", nan), "acc": train.get("train/accuracy", nan), "lr": train.get("train/lr", nan)}
    if ev:
        shown = shown_values(cfg, _eval_at(ev, "eval/"))
        out.update({SHOWN[k].label: v for k, v in shown.items() if k not in ("ce", "accuracy")})
    return out


def final_line(cfg, status: str, step: int, wall_s: float, ev: dict[str, float]) -> str:
    """train.py's last stdout line: how the run ended and the shown eval metrics at the trained depth."""
    head = f"{status} at step {step} in {wall_s:.1f}s"
    if not ev:  # stopped before anything was trained or evaluated
        return head
    shown = ", ".join(f"{k} {v:{SHOWN[k].fmt}}" for k, v in shown_values(cfg, _eval_at(ev, "eval/")).items())
    return f"{head}: eval {shown} (depth {cfg.model.iterations}, {cfg.data.source} data)"


def eval_line(cfg, step: int, ev: dict[str, float], depths: list[int]) -> str:
    """One line per eval: the shown metrics at the trained depth, then per depth."""
    names = shown_metrics(cfg)

    def fmt(values: dict[str, float], spec: str | None = None) -> list[str]:
        return [f"{values[k]:{spec or SHOWN[k].fmt}}" for k in names]

    top = shown_values(cfg, _eval_at(ev, "eval/"))
    head = " ".join(f"{SHOWN[k].label} {v}" for k, v in zip(names, fmt(top), strict=True))
    per = " ".join(f"d{n}:" + "/".join(fmt(shown_values(cfg, _eval_at(ev, f"eval/d{n}/")), ".3f")) for n in depths)
    return f"eval step {step}: {head} | {'/'.join(SHOWN[k].label for k in names)} by depth {per}"
