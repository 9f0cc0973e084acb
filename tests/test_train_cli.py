"""train.py as a subprocess: bad CLI input, SIGTERM, and SIGKILL during an async save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import TINY as _TINY

TRAIN = str(ROOT / "train.py")
TINY = [*_TINY, "train.eval_every=1000"]


def _env() -> dict:
    # JAX_PLATFORMS=cpu unless set: where libtpu is installed without a TPU (CI's tpu extra), its
    # start-up notices go to stderr at random (as in test_train_resume.py); they are not train.py's lines
    env = {"JAX_PLATFORMS": "cpu", **os.environ}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model.d_modle=32"], "unknown config key 'model.d_modle'"),
        (["train.steps=abc"], "train.steps must be an integer"),
        (["model.n_heads=3"], "must divide model.d_model"),
        (["--config", "/nonexistent/x.yaml"], "config file not found"),
        (["--bogus"], "unrecognized arguments"),
        (["data.difficulty=40"], "difficulty"),
    ],
)
def test_bad_cli_input_exits_2_with_one_line(args, needle, tmp_path):
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, TRAIN, "--workdir", str(tmp_path), *args], capture_output=True, text=True, env=_env()
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("usage:")]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - t0 < 30


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, TRAIN, "--workdir", str(workdir), *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for train.py")
        time.sleep(0.002)


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_mid_async_save_then_resume_and_sigterm(tmp_path):
    # A larger state so an async save takes a while; checkpoint every step, kill once a save is in flight.
    big = ["model.d_model=256", "model.n_heads=4", "train.checkpoint_every=1", "train.steps=100000"]
    proc = _start(tmp_path, *big)
    ckpt = tmp_path / "checkpoints"

    def saving_after_first_commit() -> bool:
        if not ckpt.exists() or not _steps(tmp_path):
            return False
        return any("tmp" in p.name for p in ckpt.iterdir())

    _wait_for(saving_after_first_commit, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = _steps(tmp_path)
    assert committed

    # Resume (partial save ignored/cleaned), then SIGTERM: it saves and exits 0.
    proc = _start(tmp_path, *big)
    # A new committed step means the resumed run is inside its loop (signal handlers installed).
    resumed = lambda: any(s > committed[-1] for s in _steps(tmp_path))
    _wait_for(resumed, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"resumed from {ckpt.resolve()}/{committed[-1]}" in err
    assert "preempted at step" in out
    final = int(out.split("preempted at step ")[1].split()[0])
    assert final > committed[-1] and final in _steps(tmp_path)
    assert not any("tmp" in p.name for p in ckpt.iterdir())
