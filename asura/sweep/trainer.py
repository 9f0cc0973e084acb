"""Running one trial's training and reading its eval events.

A trial function has the signature ``fn(cfg, workdir, on_eval) -> result``:
``on_eval(step, depths)`` is called at every eval (and may raise ``optuna.TrialPruned``),
``depths`` maps depth -> {name: value} for every ``eval/d{n}/{name}`` of the record (name in
ce, accuracy, exact_match, objective, z_loss, tokens; see asura.sweep.metrics); the result
holds at least ``{"final": depths, "step": last_step}``.

The default, ``subprocess_trial``, runs ``python train.py --config ... --workdir ...`` in
a child process and polls its metrics.jsonl. A child process (rather than calling the
train loop in-process) keeps every trial's JAX state, compilation cache and memory
separate, makes pruning a plain kill, and lets `--workers N` run trials side by side.
The cost is a JAX import + compile per trial (seconds), small next to any real trial.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from asura.config.load import config_to_yaml
from asura.config.schema import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO_ROOT / "train.py"
OnEval = Callable[[int, dict[int, dict[str, float]]], None]
TrialFn = Callable[[Config, Path, OnEval], dict]

# Transparent huge pages for the trial's allocations (glibc >= 2.35; ignored elsewhere). XLA:CPU
# allocates every call's buffers afresh and faulting them in 4 KiB pages cost 20% of the demo's
# run time (bench/RESULTS.md, "CPU step"); the Makefile exports the same. A value already in the
# environment wins.
TRIAL_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}

# asura.train writes eval/d{n}/{name} per evaluated depth, and eval/{name} repeating the trained
# depth; only the depth-keyed form is read, so a metric is always taken at a named depth.
_EVAL_KEY = re.compile(r"^eval/d(?P<depth>\d+)/(?P<name>[\w.]+)$")


class EvalEvent(NamedTuple):
    step: int
    depths: dict[int, dict[str, float]]  # depth -> {name: value}


class EvalRead(NamedTuple):
    events: list[EvalEvent]
    offset: int  # byte offset after the last complete line read


def parse_eval(record: dict) -> EvalEvent | None:
    """The eval event of one metrics.jsonl record, or None when it holds no eval/d{n}/... key."""
    depths: dict[int, dict[str, float]] = {}
    for key, value in record.items():
        match = _EVAL_KEY.match(key)
        if match and isinstance(value, int | float):
            depths.setdefault(int(match["depth"]), {})[match["name"]] = float(value)
    return EvalEvent(int(record.get("step", 0)), depths) if depths else None


def read_evals(path: Path, start: int = 0) -> EvalRead:
    """Eval events from byte offset ``start`` of a metrics.jsonl, and the offset to resume from."""
    if not path.exists():
        return EvalRead([], start)
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written stays for the next poll
    events = []
    for line in data[:end].splitlines():
        try:
            ev = parse_eval(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
        if ev is not None:
            events.append(ev)
    return EvalRead(events, start + end)


def subprocess_trial(cfg: Config, workdir: Path, on_eval: OnEval, poll_s: float = 0.5) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "trial_config.yaml"
    cfg_path.write_text(config_to_yaml(cfg))
    log = (workdir / "train.log").open("w")
    cmd = [sys.executable, str(TRAIN_PY), "--config", str(cfg_path), "--workdir", str(workdir)]
    # W&B (train.wandb=true) groups a sweep's trials under the sweep dir's name (DIR/trials/<id>).
    env = {
        "ASURA_WANDB_GROUP": workdir.resolve().parent.parent.name,
        **TRIAL_ENV,
        **os.environ,
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    offset, last = 0, None
    try:
        while True:
            done = proc.poll() is not None
            events, offset = read_evals(workdir / "metrics.jsonl", offset)
            for step, depths in events:
                last = (step, depths)
                on_eval(step, depths)  # may raise TrialPruned: the finally kills the child
            if done:
                break
            time.sleep(poll_s)
        if proc.returncode != 0:
            tail = (workdir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"train.py exited {proc.returncode}: {tail[0][:300]}")
        if last is None:
            raise RuntimeError(f"no eval event in {workdir / 'metrics.jsonl'}; is train.eval_every <= train.steps?")
        if last[0] != cfg.train.steps:  # exit 0 after a signal: saved and stopped early, not finished
            raise RuntimeError(f"train.py stopped at step {last[0]} of {cfg.train.steps} (a signal?); not complete")
        return {"final": last[1], "step": last[0]}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
