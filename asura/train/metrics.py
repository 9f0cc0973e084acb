"""Metric sinks: metrics.jsonl, TensorBoard (tensorboardX), optional W&B, and a tqdm bar.

Only process 0 writes. Records are flat dicts of floats keyed like
``train/loss`` or ``eval/d3/exact_match``; every record carries ``step``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


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


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records logged after `max_step` (work a killed run did after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:  # torn last line from a kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict]:
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
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if cfg.train.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
        if cfg.train.wandb:
            self.wandb = _wandb_run(workdir, cfg)
        if cfg.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, file=sys.stderr)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time(), **record}
        self.jsonl.write(json.dumps(rec, allow_nan=True) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=step)

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
        self.bar.refresh()

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
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
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


def bar_fields(train: dict, ev: dict) -> dict[str, float]:
    nan = float("nan")
    return {
        "ce": train.get("train/ce", nan),
        "acc": train.get("train/accuracy", nan),
        "lr": train.get("train/lr", nan),
        "em": ev.get("eval/exact_match", nan),
    }


def eval_line(step: int, ev: dict[str, float], depths: list[int]) -> str:
    nan = float("nan")
    per = " ".join(
        f"d{n}:{ev.get(f'eval/d{n}/ce', nan):.3f}/{ev.get(f'eval/d{n}/exact_match', nan):.2f}" for n in depths
    )
    return f"eval step {step}: ce {ev.get('eval/ce', nan):.4f} em {ev.get('eval/exact_match', nan):.3f} | ce/em {per}"
