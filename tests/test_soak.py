"""Kill-anywhere soak: SIGKILL train.py at >= 10 moments (start-up, mid-step, inside async
saves), rerun until it finishes, and require the result to equal a straight run bit for bit:
params, optimiser state, data-iterator state and every metrics.jsonl record (minus wall-clock
fields). Run as users run it (progress bar and TensorBoard on), with log, eval and checkpoint
intervals that do not divide each other, so resumes land between log records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY, tiny_config

from asura.train.checkpoint import CheckpointStore
from asura.train.state import abstract_state

ARGS = [*TINY, "train.steps=24", "train.checkpoint_every=3", "train.log_every=4", "train.eval_every=5",
        "depth.schedule=uniform", "depth.min=1", "train.async_checkpoint=true", "train.progress=true",
        "train.tensorboard=true"]  # fmt: skip
WALL_CLOCK = ("time", "train/tokens_per_s", "train/tokens_per_s_per_device", "train/tflops_per_device", "train/mfu")
# (kind, arg): "startup" kills after arg seconds; "step" once metrics.jsonl reaches step arg;
# "saving" while an orbax temporary checkpoint directory exists (a save in flight).
KILLS = [("startup", 0.4), ("startup", 2.0), ("step", 2), ("saving", 0), ("step", 7), ("saving", 0),
         ("step", 11), ("saving", 0), ("step", 16), ("saving", 0), ("step", 22), ("saving", 0)]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def _start(workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _last_step(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue
    return max(steps, default=0)


def _saving(workdir: Path) -> bool:
    d = workdir / "checkpoints"
    return d.is_dir() and any("tmp" in p.name for p in d.iterdir())


def _kill_at(proc: subprocess.Popen, workdir: Path, kind: str, arg: float, timeout: float = 120) -> bool:
    """Kill when the moment comes; False if the run ended first."""
    t0 = time.time()
    while proc.poll() is None:
        now = time.time() - t0
        if (kind == "startup" and now >= arg) or (kind == "step" and _last_step(workdir) >= arg):
            break
        if kind == "saving" and _saving(workdir):
            break
        if now > timeout:
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def _final(workdir: Path, cfg):
    store = CheckpointStore(workdir / "checkpoints", keep=3, async_save=False)
    try:
        state, data_state, _ = store.restore(cfg.train.steps, abstract_state(cfg).state)
    finally:
        store.close()
    records = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records.append({k: v for k, v in rec.items() if k not in WALL_CLOCK})
    return state, data_state, records


@pytest.mark.slow
def test_kill_anywhere_resumes_to_the_straight_run(tmp_path):
    cfg = tiny_config(*ARGS[len(TINY) :])
    straight = _start(tmp_path / "straight")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]

    killed_dir, kills = tmp_path / "killed", 0
    for kind, arg in KILLS:
        if _kill_at(_start(killed_dir), killed_dir, kind, arg):
            kills += 1
    for _ in range(3):  # finish; a kill after the last save may already have left a finished run
        proc = _start(killed_dir)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        if "done at step 24" in out:
            break
    assert kills >= 10, f"only {kills} kill points landed"

    a_state, a_data, a_log = _final(tmp_path / "straight", cfg)
    b_state, b_data, b_log = _final(killed_dir, cfg)
    for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a_data == b_data
    assert [r["step"] for r in a_log] == [r["step"] for r in b_log]
    for a, b in zip(a_log, b_log, strict=True):
        assert a == b, f"step {a['step']}: {sorted(k for k in a if a.get(k) != b.get(k))}"
