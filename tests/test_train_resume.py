"""Resuming keeps the run's record and history: what a kill, a corrupt step or an extension leaves.

* train records after a resume equal a straight run's, also when checkpoint_every is not a multiple
  of log_every (the steps since the last record are carried in the checkpoint);
* the newest step after a kill may lack its file checksums: it is still verified against the seal
  committed with it, so a flipped byte falls back instead of training on;
* when no step restores, the refusal moves nothing, so a rerun is refused again (never a silent
  restart from step 0 over the run's history);
* raising train.steps on a trained run asks how the lr goes on (--extend continue | rewarm), and
  either choice leaves every trained step's lr as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, quiet, stop_at, tiny_config

from asura.train import integrity
from asura.train.checkpoint import CheckpointError, ConfigMismatchError
from asura.train.loop import FAST_COMPILE
from asura.train.loop import run as _run
from asura.train.metrics import read_jsonl
from asura.train.optim import lr_schedule

WALL_CLOCK = ("time", "train/tokens_per_s", "train/tokens_per_s_per_device", "train/tflops_per_device", "train/mfu")
# Intervals that divide neither each other nor train.steps' multiples in step: records at 3, 6, 9, 11;
# checkpoints at 4, 8, 11; evals at 5, 10, 11.
INTERVALS = ("train.log_every=3", "train.checkpoint_every=4", "train.eval_every=5", "train.steps=11")


def run(cfg, workdir, **kw):
    return _run(cfg, workdir, compiler_options=FAST_COMPILE, say=kw.pop("say", quiet), **kw)


def records(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_jsonl(workdir / "metrics.jsonl")]


def tree(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("straight")
    run(tiny_config(*INTERVALS, "depth.schedule=uniform", "depth.min=1"), wd)
    return wd


# just after a record; between records; after a record and an eval (6 and 10 run with the slow tests)
@pytest.mark.parametrize("stop", [pytest.param(6, marks=pytest.mark.slow), 7, pytest.param(10, marks=pytest.mark.slow)])
def test_every_metrics_record_after_a_resume_equals_the_straight_run(straight, tmp_path, stop):
    cfg = tiny_config(*INTERVALS, "depth.schedule=uniform", "depth.min=1")
    run(cfg, tmp_path, hooks=stop_at(stop))  # what a kill at `stop` leaves: the last checkpoint is at 4 or 8
    out = run(cfg, tmp_path)
    assert out["resumed_from"] in (4, 8) and out["step"] == 11
    want, got = records(straight), records(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        assert a == b, f"step {a['step']}: {sorted(k for k in a if a.get(k) != b.get(k))}"


def test_tensorboard_after_a_resume_shows_what_metrics_jsonl_shows(tmp_path):
    """TensorBoard's own reader (which drops the steps a restarted run redid) against the log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(*INTERVALS, "train.tensorboard=true")
    run(cfg, tmp_path, hooks=stop_at(7))  # logged step 6, checkpoint at 4: steps 5-6 are redone
    run(cfg, tmp_path)
    assert len(list((tmp_path / "tb").iterdir())) == 2  # one event file per process that trained
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    log = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("train/ce", "train/lr", "eval/ce"):
        want = [(r["step"], r[key]) for r in log if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)  # TB stores float32


def test_a_step_without_file_checksums_is_verified_by_its_seal(tmp_path):
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", "train.eval_every=4")
    run(cfg, tmp_path)
    newest = tmp_path / "checkpoints" / "4"
    (newest / integrity.CHECKSUMS).unlink()  # a kill between the commit and the checksum write
    target = largest_state_file(newest)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit of array data
    target.write_bytes(bytes(raw))
    messages: list[str] = []
    out = run(cfg, tmp_path, say=messages.append)
    assert out["resumed_from"] == 2 and out["step"] == 4, messages
    assert any("checkpoint step 4 is unreadable" in m for m in messages), messages
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_bad").iterdir()] == ["4"]


def test_a_verified_step_without_checksums_gets_them(tmp_path):
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=2", "train.eval_every=2")
    run(cfg, tmp_path)
    step = tmp_path / "checkpoints" / "2"
    (step / integrity.CHECKSUMS).unlink()
    out = run(cfg, tmp_path)  # finished: restores, verifies its seal, reports
    assert out["resumed_from"] == 2
    assert (step / integrity.CHECKSUMS).exists() and integrity.verify(step) is None


def test_an_edited_meta_item_is_corruption(tmp_path):
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", "train.eval_every=4")
    run(cfg, tmp_path)
    meta_file = next(p for p in (tmp_path / "checkpoints" / "4" / "meta").iterdir() if p.name != "commit_success.txt")
    meta = json.loads(meta_file.read_text())
    meta["step"] = 40  # valid JSON, plausible value: only the seal can tell
    meta_file.write_text(json.dumps(meta))
    integrity.write_checksums(tmp_path / "checkpoints" / "4")
    messages: list[str] = []
    out = run(cfg, tmp_path, say=messages.append)
    assert out["resumed_from"] == 2 and out["step"] == 4
    assert any("meta item does not match" in m for m in messages), messages


def test_when_no_step_restores_a_rerun_is_refused_again(tmp_path):
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", "train.eval_every=2")
    run(cfg, tmp_path)
    for step in ("2", "4"):
        for f in (tmp_path / "checkpoints" / step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    before = tree(tmp_path)
    for _ in range(2):  # the refusal, then the plain rerun that used to train from 0 over the history
        with pytest.raises(CheckpointError, match="nothing was moved"):
            run(cfg, tmp_path)
        after = tree(tmp_path)
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert not (tmp_path / "checkpoints_bad").exists()


# ------------------------------------------------------------------------------ extending a run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_config("train.steps=6", "train.checkpoint_every=3", "train.eval_every=6"), wd)
    return wd


def _lrs(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/lr" in r}


@pytest.mark.parametrize("how", ["continue", "rewarm"])
def test_extending_keeps_every_trained_steps_lr(finished, tmp_path, how):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    old_cfg = tiny_config("train.steps=6", "train.checkpoint_every=3", "train.eval_every=6")
    longer = tiny_config("train.steps=12", "train.checkpoint_every=3", "train.eval_every=6")
    with pytest.raises(ConfigMismatchError, match=r"--extend continue .* or --extend rewarm"):
        run(longer, wd)
    before = _lrs(wd)
    messages: list[str] = []
    out = run(longer, wd, extend=how, say=messages.append)
    assert out["resumed_from"] == 6 and out["step"] == 12
    assert any(m.startswith("extending train.steps 6 -> 12") for m in messages), messages
    event = "hold_at" if how == "continue" else "rewarm_at"
    assert getattr(out["cfg"].train, event) == (6,)
    assert f"{event}:\n- 6" in (wd / "config.yaml").read_text() or f"{event}: [6]" in (wd / "config.yaml").read_text()
    lrs = _lrs(wd)
    assert {s: lrs[s] for s in before} == before  # the trained steps' records are untouched
    # the logged lr of step s is the schedule at optimiser step s - 1 (the lr its update used)
    floor = old_cfg.train.lr * old_cfg.train.min_lr_ratio
    new = [lrs[s] for s in range(7, 13)]
    if how == "continue":
        np.testing.assert_allclose(new, floor, rtol=1e-6)  # float32 of lr * ratio
    else:
        assert max(new) > 10 * floor  # warmed up again
        np.testing.assert_allclose(new, [float(lr_schedule(out["cfg"].train)(s - 1)) for s in range(7, 13)])
    # the same command again (what a rerun after a kill does) changes nothing: the event is inherited
    again = run(longer, wd, extend=how)
    assert again["resumed_from"] == 12 and getattr(again["cfg"].train, event) == (6,)
    assert _lrs(wd) == lrs


def test_extension_refused_in_one_line_before_anything_is_opened(finished, tmp_path):
    """As a user runs it: progress bar and TensorBoard on, a real subprocess."""
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    before = tree(wd)
    sinks_on = ("train.progress=true", "train.tensorboard=true")
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(wd), "--config", str(wd / "config.yaml"),
           "train.steps=12", *sinks_on]  # fmt: skip
    # JAX_PLATFORMS=cpu: where libtpu is installed (CI's tpu extra) its start-up notices go to stderr
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert "would change the lr of steps already trained" in lines[0] and "--extend" in lines[0]
    assert tree(wd) == before  # no TensorBoard file, no rewritten lock, config or log
