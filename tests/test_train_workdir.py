"""A workdir that survives anything: corruption vs mismatch, reruns, torn files, locks, full disks.

Each test reproduces one failure a preemptible pod produces and checks the workdir is left
usable (and untouched where the run refuses).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY, quiet, stop_at, tiny_config, train_main

from asura.train import integrity
from asura.train.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointStore, SaveError
from asura.train.loop import FAST_COMPILE
from asura.train.loop import run as _run
from asura.train.metrics import read_jsonl
from asura.train.workdir import WorkdirError, WorkdirLock, write_config


def run(cfg, workdir, **kw):
    return _run(cfg, workdir, compiler_options=FAST_COMPILE, say=kw.pop("say", quiet), **kw)


def tiny(*extra):
    return tiny_config("train.eval_every=2", "train.checkpoint_every=2", *extra)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def steps_of(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------ store level


def _store_with(tmp_path, trees: dict[int, dict]) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt", keep=5, async_save=False)
    for step, tree in trees.items():
        store.save(step, tree, {"pos": step}, {"step": step})
    store.wait()
    return store


def test_tree_mismatch_refuses_and_moves_nothing(tmp_path):
    store = _store_with(tmp_path, {1: {"w": jnp.zeros(4)}, 2: {"w": jnp.zeros(4)}})
    before = snapshot(tmp_path)
    for abstract, needle in (
        ({"w": jnp.zeros(5)}, "w has shape (4,) in the checkpoint but (5,)"),
        ({"w": jnp.zeros(4, jnp.int32)}, "w has dtype float32 in the checkpoint but int32"),
        ({"w": jnp.zeros(4), "b": jnp.zeros(1)}, "b is new in this code"),
    ):
        with pytest.raises(CheckpointMismatchError, match=__import__("re").escape(needle)):
            store.restore_latest_valid(abstract, warn=quiet)
    assert snapshot(tmp_path) == before and not (tmp_path / "checkpoints_bad").exists()
    store.close()


def test_flipped_bit_is_caught_by_checksum_and_falls_back(tmp_path):
    store = _store_with(tmp_path, {1: {"w": jnp.arange(64.0)}, 2: {"w": jnp.arange(64.0) + 1}})
    target = max(
        (p for p in (tmp_path / "ckpt" / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the largest state file
    target.write_bytes(bytes(raw))
    assert integrity.verify(tmp_path / "ckpt" / "2") is not None
    messages: list[str] = []
    restored = store.restore_latest_valid({"w": jnp.zeros(64)}, warn=messages.append)
    assert restored.step == 1 and float(restored.state["w"][3]) == 3.0
    assert any("checkpoint step 2 is unreadable" in m and "checksum" in m for m in messages)
    assert list((tmp_path / "checkpoints_bad").iterdir())
    store.close()


def test_all_steps_corrupt_refuses_instead_of_retraining(tmp_path):
    store = _store_with(tmp_path, {1: {"w": jnp.zeros(8)}})
    for p in (tmp_path / "ckpt" / "1" / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="refusing to retrain from step 0"):
        store.restore_latest_valid({"w": jnp.zeros(8)}, warn=quiet)
    store.close()


def test_unreadable_newest_step_that_cannot_be_moved_falls_back(tmp_path, monkeypatch):
    # Root ignores chmod, so the permission error is injected where the store meets the filesystem.
    store = _store_with(tmp_path, {1: {"w": jnp.ones(4)}, 2: {"w": jnp.ones(4)}})
    real_verify = integrity.verify
    monkeypatch.setattr(
        "asura.train.checkpoint.verify",
        lambda d: "permission denied: " + str(d) if d.name == "2" else real_verify(d),
    )

    def no_move(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr("asura.train.checkpoint.shutil.move", no_move)
    messages: list[str] = []
    restored = store.restore_latest_valid({"w": jnp.zeros(4)}, warn=messages.append)
    assert restored.step == 1
    assert any("could not move checkpoint step 2 aside" in m for m in messages)
    store.close()


def test_disk_full_is_one_line_and_keeps_the_last_good_step(tmp_path, monkeypatch):
    store = _store_with(tmp_path, {1: {"w": jnp.ones(1024)}})
    usage = type("Usage", (), {"free": 100, "total": 10**9, "used": 10**9})
    monkeypatch.setattr("asura.train.checkpoint.shutil.disk_usage", lambda p: usage)
    with pytest.raises(SaveError, match=r"checkpoint .*/2: 100 bytes free, the state needs 4,096"):
        store.save(2, {"w": jnp.ones(1024)}, {"pos": 2}, {"step": 2})
    assert store.steps() == [1]
    store.close()


# ------------------------------------------------------------- loop level


def _reseal(step_dir: Path, data: object) -> None:
    """Give a step another data state *as if it had been saved that way*: data file, meta seal and file
    checksums all consistent (what another data pipeline's code would have written)."""
    data_file = next(p for p in (step_dir / "data").rglob("*") if p.is_file() and p.name != "commit_success.txt")
    data_file.write_text(json.dumps(data))
    meta_file = next(p for p in (step_dir / "meta").rglob("*") if p.is_file() and p.name != "commit_success.txt")
    meta = json.loads(meta_file.read_text())
    sealed = meta[integrity.SEAL]
    sealed["data_sha256"] = integrity._sha256(data)
    sealed["meta_sha256"] = integrity._meta_digest(meta, sealed)
    meta_file.write_text(json.dumps(meta))
    integrity.write_checksums(step_dir)


def test_wrong_data_state_refuses_and_moves_nothing(tmp_path):
    run(tiny("train.steps=2"), tmp_path)
    _reseal(tmp_path / "checkpoints" / "2", {"not": "a grain state"})  # intact files, foreign content
    before = snapshot(tmp_path / "checkpoints")
    with pytest.raises(CheckpointMismatchError, match="data-iterator state"):
        run(tiny("train.steps=4"), tmp_path, extend="continue")
    assert snapshot(tmp_path / "checkpoints") == before


def test_rerun_of_finished_run_reports_final_metrics(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), *TINY, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]
    main = train_main()
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0  # crashed with a TypeError on None before
    again = capsys.readouterr()
    assert "done at step 2" in again.out and "eval ce" in again.out and "nan" not in again.out.split("eval ce")[1][:8]
    assert first.split("eval ce")[1] == again.out.split("eval ce")[1]  # the same final metrics


def test_torn_config_yaml_does_not_brick_the_workdir(tmp_path):
    cfg = tiny("train.steps=2")
    run(cfg, tmp_path)
    (tmp_path / "config.yaml").write_text("")  # what a kill during the old in-place rewrite left
    out = run(tiny("train.steps=4"), tmp_path, extend="continue")
    assert out["resumed_from"] == 2 and out["step"] == 4
    assert "d_model: 32" in (tmp_path / "config.yaml").read_text()


def test_write_config_is_atomic(tmp_path, monkeypatch):
    from etils import epath

    write_config(tmp_path, "old: 1\n")
    local = type(epath.Path(tmp_path))

    def dies(self, data):
        with open(self, "wb") as f:
            f.write(data[:3])
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(local, "write_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        write_config(tmp_path, "new: 2\n")
    monkeypatch.undo()
    assert (tmp_path / "config.yaml").read_text() == "old: 1\n"


def test_second_trainer_on_a_locked_workdir_is_refused(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with WorkdirLock(tmp_path):
        before = snapshot(tmp_path)
        with pytest.raises(WorkdirError, match="in use by another trainer"):
            run(tiny("train.steps=2"), tmp_path)
        assert snapshot(tmp_path) == before
    out = run(tiny("train.steps=2"), tmp_path)  # released: the next trainer runs
    assert out["status"] == "done"


def test_metrics_log_never_repeats_steps(tmp_path):
    cfg = tiny("train.steps=4", "train.checkpoint_every=4", "train.eval_every=4")
    run(cfg, tmp_path / "a", hooks=stop_at(3))  # killed before the first checkpoint: steps 1-3 logged
    with (tmp_path / "a" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "train/ce": 1.0')  # and a torn last line
    run(cfg, tmp_path / "a")
    steps = [r["step"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "train/ce" in r]
    assert steps == [1, 2, 3, 4]


def _catches_sigterm(pid: int) -> bool:
    """True once the process has installed a SIGTERM handler (its SigCgt mask in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except FileNotFoundError:
        pass
    return False


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly(tmp_path):
    """The handlers are installed before the slow imports: a SIGTERM any time after that (imports,
    JAX start-up, compilation) exits 0 with no traceback and leaves no checkpoint. (Before the
    interpreter runs train.py at all, nothing can catch a signal; the test waits for the handler.)"""
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path), *TINY, "train.steps=50"]
    for delay in (0.0, 0.5, 1.5):  # after the handler: imports, config, JAX start-up, compilation
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        t0 = time.time()
        while not _catches_sigterm(proc.pid) and proc.poll() is None and time.time() - t0 < 60:
            time.sleep(0.001)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "jaxlib" not in maps, "the SIGTERM handler must be installed before JAX is imported"
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        if "before the first step" in err:
            assert not (tmp_path / "checkpoints").exists() or not steps_of(tmp_path)


def test_tiny_runs_leave_checksums(tmp_path):
    run(tiny("train.steps=2"), tmp_path)
    step = tmp_path / "checkpoints" / "2"
    assert (step / integrity.CHECKSUMS).exists() and integrity.verify(step) is None
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1].get("eval/ce", np.nan))
