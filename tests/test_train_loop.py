"""In-process loop tests: learning, bit-exact resume, corrupt-checkpoint fallback, NaN abort."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import poison, quiet, stop_at, tiny_config

from asura.train.loop import FAST_COMPILE, NonFiniteError
from asura.train.loop import run as _run
from asura.train.metrics import read_jsonl

TIMING_KEYS = ("time", "train/tokens_per_s", "train/tokens_per_s_per_device", "train/tflops_per_device", "train/mfu")


def run(cfg, workdir, **kw):
    return _run(cfg, workdir, compiler_options=FAST_COMPILE, **kw)


def tiny(*extra: str):
    return tiny_config(*extra)


def _records(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(workdir / "metrics.jsonl")]


def test_tiny_run_learns_and_writes_workdir(tmp_path):
    cfg = tiny("train.steps=30", "train.eval_every=30", "train.checkpoint_every=30", "train.tensorboard=true")
    out = run(cfg, tmp_path, say=quiet)
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/ce" in r]
    first, last = np.mean([r["train/ce"] for r in recs[:3]]), np.mean([r["train/ce"] for r in recs[-3:]])
    assert last < first - 0.5, (first, last)
    assert out["status"] == "done" and out["step"] == 30 and out["nan_total"] == 0
    assert {"eval/ce", "eval/objective", "eval/exact_match", "eval/d1/ce", "eval/d2/exact_match"} <= set(out["eval"])
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "30").is_dir()
    assert list((tmp_path / "tb").iterdir())
    rec = recs[-1]
    assert {"train/objective", "train/ce", "train/z_loss", "train/grad_norm", "train/lr"} <= set(rec)
    # guidance=none scores only the final iteration: the per-iteration CE of iteration 1 was never
    # computed, so it is NaN (not 0) in the step and absent from the log.
    assert "train/ce_per_iter/2" in rec and "train/ce_per_iter/1" not in rec
    assert rec["train/depth"] == 2 and rec["train/tokens_per_s"] > 0
    assert "train/mfu" in rec  # None on CPU: no known peak


def test_resume_is_bit_exact(tmp_path):
    cfg = tiny("train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "depth.schedule=uniform")
    straight = run(cfg, tmp_path / "a", say=quiet)
    first = run(cfg, tmp_path / "b", hooks=stop_at(6), say=quiet)  # "killed" at 6: checkpoint 4, logs to 6
    assert first["status"] == "stopped"
    resumed = run(cfg, tmp_path / "b", say=quiet)
    assert resumed["resumed_from"] == 4
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _records(tmp_path / "a") == _records(tmp_path / "b")  # logs past step 4 were dropped and redone
    depths = {r["train/depth"] for r in _records(tmp_path / "a") if "train/depth" in r}
    assert len(depths) > 1  # the sampled depth really varies (one compiled program)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    cfg = tiny("train.steps=4", "train.eval_every=2", "train.checkpoint_every=2")
    run(cfg, tmp_path, say=quiet)
    latest = tmp_path / "checkpoints" / "4"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    messages: list[str] = []
    cfg6 = tiny("train.steps=6", "train.eval_every=2", "train.checkpoint_every=2")
    out = run(cfg6, tmp_path, say=messages.append, extend="continue")
    assert out["resumed_from"] == 2 and out["step"] == 6
    assert any("checkpoint step 4 is unreadable" in m for m in messages)
    assert list((tmp_path / "checkpoints_bad").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6


def test_nan_steps_skipped_then_abort(tmp_path):
    cfg = tiny("train.steps=6", "train.eval_every=6", "train.checkpoint_every=2", "train.max_nan_steps=3")
    out = run(cfg, tmp_path / "skip", hooks=poison({1, 2}), say=quiet)
    assert out["status"] == "done" and out["nan_total"] == 2
    recs = {r["step"]: r for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl") if "train/finite" in r}
    assert recs[2]["train/finite"] == 0 and recs[3]["train/nan_streak"] == 2 and recs[4]["train/nan_streak"] == 0
    assert recs[2]["train/lr"] == recs[3]["train/lr"] == recs[4]["train/lr"]  # schedule frozen while skipping

    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        run(cfg, tmp_path / "abort", hooks=poison({2, 3, 4, 5}), say=quiet)
    steps = sorted(int(p.name) for p in (tmp_path / "abort" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]  # the last good checkpoint is kept: nothing is saved during a NaN streak
