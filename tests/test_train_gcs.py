"""Training with the workdir and the data on gs://, against the GCS protocol on loopback
(tests/gcs_emulator.py: gcp-storage-emulator, the precondition and generation headers filled in).

What a pod user relies on, each checked here: a run killed and resumed on a bucket equals a straight
local run bit for bit (params, every metrics record, TensorBoard); a SIGKILLed train.py resumes the
same way; two trainers on one gs:// workdir: one is refused; a stale lock is taken over and its old
holder stops; a corrupt object in the newest step falls back to the previous one; evaluate and
generate and export read a gs:// workdir; a fine-tune starts from a gs:// run (train.init_from); a bucket
that does not exist, another scheme or a missing package is one line before anything compiles.

The three tests that start real train.py processes are marked slow (about two minutes together);
CI runs them after the suite (.ci/run), with the README test.
"""

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
from conftest import ROOT, TINY, quiet, stop_at, tiny_config

from asura.storage.paths import files_under, to_path
from asura.storage.records import read_records
from asura.train.loop import FAST_COMPILE
from asura.train.loop import run as _run
from asura.train.workdir import WorkdirError

WALL_CLOCK = ("time", "train/tokens_per_s", "train/tokens_per_s_per_device", "train/tflops_per_device", "train/mfu")
TEXT = ("data.source=text", "data.seq_len=32", "train.eval_batches=1")
INTERVALS = ("train.steps=10", "train.log_every=3", "train.checkpoint_every=4", "train.eval_every=5")


def run(cfg, workdir, **kw):
    return _run(cfg, workdir, compiler_options=FAST_COMPILE, say=kw.pop("say", quiet), **kw)


def records(workdir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_records(workdir)]


def params_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def corpus_docs() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(["ab", "cd", "efg", "hij"], size=60)) for _ in range(40)]


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory, corpus_docs) -> Path:
    from asura.data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "shards"
    prepare(corpus_docs, str(out), eval_fraction=0.1, eval_min_tokens=100)
    return out


@pytest.fixture
def gcs_corpus(gcs, corpus_docs, tmp_path, monkeypatch) -> str:
    from asura.data.prepare import prepare_remote

    monkeypatch.setenv("ASURA_DATA_CACHE", str(tmp_path / "cache"))
    prepare_remote(corpus_docs, f"{gcs}/data", "byte", eval_fraction=0.1, eval_min_tokens=100)
    return f"{gcs}/data"


def test_a_killed_run_on_a_bucket_resumes_to_the_straight_local_run(gcs, gcs_corpus, local_corpus, tmp_path):
    local_cfg = tiny_config(*TEXT, *INTERVALS, f"data.path={local_corpus}", "train.tensorboard=true")
    straight = run(local_cfg, tmp_path / "straight")
    gcs_cfg = tiny_config(*TEXT, *INTERVALS, f"data.path={gcs_corpus}", "train.tensorboard=true")
    workdir = f"{gcs}/run"
    run(gcs_cfg, workdir, hooks=stop_at(7))  # checkpoint 4 committed; records 6 (and 5's eval) past it
    resumed = run(gcs_cfg, workdir)
    assert resumed["resumed_from"] == 4 and resumed["step"] == 10
    params_equal(straight["params"], resumed["params"])
    assert records(workdir) == records(tmp_path / "straight")
    assert not to_path(f"{workdir}/.lock").exists()  # released
    # TensorBoard's own reader over the bucket's event files: what a killed run redid is dropped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    tb.mkdir()
    for f in files_under(to_path(f"{workdir}/tb")):
        (tb / f.name).write_bytes(f.read_bytes())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    want = [(r["step"], r["train/ce"]) for r in records(workdir) if "train/ce" in r]
    got = [(e.step, e.value) for e in acc.Scalars("train/ce")]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)  # TB stores float32


def _train_cmd(workdir: str, corpus: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--workdir", workdir, *TINY, *TEXT, *INTERVALS,
            f"data.path={corpus}", "train.progress=true", "train.tensorboard=true", *extra]  # fmt: skip


def _env(tmp_path) -> dict:
    env = dict(os.environ)  # the emulator's address (conftest's gcs_server), for the child's clients
    env.update(JAX_PLATFORMS="cpu", ASURA_DATA_CACHE=str(tmp_path / "cache"))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


@pytest.mark.slow  # a real train.py per process: CI runs it (.ci/run), `make test` does not
def test_train_py_sigkilled_on_a_bucket_resumes_bit_exactly(gcs, gcs_corpus, local_corpus, tmp_path):
    """As users run it: a real process, progress bar and TensorBoard on, killed with SIGKILL once its
    first checkpoint is committed; the rerun ends where a straight run (local workdir) ends."""
    env = _env(tmp_path)
    straight = subprocess.run(_train_cmd(str(tmp_path / "straight"), str(local_corpus)), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    workdir = f"{gcs}/run"
    proc = subprocess.Popen(_train_cmd(workdir, gcs_corpus), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = to_path(f"{workdir}/checkpoints/4/commit_success.txt")
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again = subprocess.run(_train_cmd(workdir, gcs_corpus), env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0 and "done at step 10" in again.stdout, again.stderr[-2000:]
    assert "resumed from" in again.stderr
    assert records(workdir) == records(tmp_path / "straight")


@pytest.mark.slow  # a real train.py per process: CI runs it (.ci/run), `make test` does not
def test_two_trainers_on_one_bucket_workdir_one_is_refused(gcs, gcs_corpus, tmp_path):
    env = _env(tmp_path)
    workdir, cwd = f"{gcs}/run", tmp_path / "cwd"
    cwd.mkdir()
    cmds = [_train_cmd(workdir, gcs_corpus, "train.progress=false") for _ in range(2)]
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    lines = [ln for ln in refused.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is in use by another trainer" in lines[0], refused
    assert not list(cwd.iterdir())  # a gs:// run creates nothing local (no `gs:/...` directory, no lock, no log)


def test_a_stale_lock_is_taken_over_and_its_holder_stops(gcs):
    from asura.storage.lock import LockBusy, ObjectLock

    first = ObjectLock(gcs, heartbeat_s=0.2, stale_s=1.0)
    first.acquire()
    with pytest.raises(LockBusy, match="is in use by another trainer"):
        ObjectLock(gcs, heartbeat_s=0.2, stale_s=1.0).acquire()
    first._stop.set()  # the holder hangs (or its host is gone): no more heartbeats
    first._thread.join()
    time.sleep(1.5)
    second = ObjectLock(gcs, heartbeat_s=0.2, stale_s=1.0).acquire()
    assert second.took_over is not None and "pid" in second.took_over
    first._stop.clear()  # the old holder wakes up: its next heartbeat finds the lock taken
    first._heartbeat_once()
    assert first.lost is not None and "lost the lock" in first.lost
    first.release()  # does not delete the new holder's lock
    assert to_path(f"{gcs}/.lock").exists()
    second.release()
    assert not to_path(f"{gcs}/.lock").exists()


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over_at_once(gcs):
    """A run killed and rerun on the same machine need not wait STALE_S for its own old lock."""
    import socket

    from asura.storage import gcs as objects
    from asura.storage.lock import LockBusy, ObjectLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    objects.create_if_absent(f"{gcs}/.lock", json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    lock = ObjectLock(gcs).acquire()  # default stale_s (120 s): only the dead pid lets it in
    assert lock.took_over is not None and f"pid {dead.pid}" in lock.took_over
    lock.release()
    objects.create_if_absent(f"{gcs}/.lock", json.dumps({"host": "another-host", "pid": dead.pid}).encode())
    with pytest.raises(LockBusy, match="another-host"):  # another host's pid says nothing here
        ObjectLock(gcs).acquire()


def test_a_trainer_that_lost_its_lock_stops_without_saving(gcs, gcs_corpus, monkeypatch):
    from asura.storage import gcs as objects

    cfg = tiny_config(*TEXT, "train.steps=6", "train.checkpoint_every=2", "train.eval_every=6",
                      f"data.path={gcs_corpus}")  # fmt: skip
    workdir = f"{gcs}/run"

    def steal(step: int, batch: dict) -> dict:
        if step == 3:  # another trainer takes the workdir over (here: the lock object is replaced)
            held = objects.read(f"{workdir}/.lock")
            objects.replace_if(f"{workdir}/.lock", b'{"host": "thief"}', held.generation)
        return batch

    from asura.storage import lock as lock_lib
    from asura.train.loop import Hooks

    # The theft here is not a stale takeover, so the throttle's reasoning (a lock written under a
    # second ago cannot have been taken over) does not hold: confirm at every boundary. The heartbeat
    # keeps its 15 s, so only the trainer's own confirm can notice: no race with a thread.
    monkeypatch.setattr(lock_lib, "CONFIRM_S", 0.0)
    with pytest.raises(WorkdirError, match=r"lost the lock.*stopped at step 4 without saving"):
        run(cfg, workdir, hooks=Hooks(before_step=steal))
    steps = sorted(int(p.name) for p in to_path(f"{workdir}/checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]  # nothing saved after the lock was lost
    assert max(r["step"] for r in read_records(workdir)) <= 3  # nor logged
    assert objects.read(f"{workdir}/.lock").data == b'{"host": "thief"}'  # the new holder's lock is left alone


def test_confirm_writes_the_lock_at_most_once_a_second(gcs):
    """A lock written under CONFIRM_S ago cannot have been taken over (that needs STALE_S without a
    write), and GCS takes about one write per second to an object: confirm skips such writes."""
    from asura.storage import gcs as objects
    from asura.storage.lock import CONFIRM_S, ObjectLock

    lock = ObjectLock(f"{gcs}/run", heartbeat_s=3600).acquire()
    try:
        gen = objects.read(f"{gcs}/run/.lock").generation
        assert lock.confirm() is None and objects.read(f"{gcs}/run/.lock").generation == gen
        time.sleep(CONFIRM_S)
        assert lock.confirm() is None and objects.read(f"{gcs}/run/.lock").generation > gen
    finally:
        lock.release()
    assert objects.read(f"{gcs}/run/.lock") is None


def test_a_corrupt_object_in_the_newest_step_falls_back(gcs, gcs_corpus):
    cfg = tiny_config(*TEXT, "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4",
                      f"data.path={gcs_corpus}")  # fmt: skip
    workdir = f"{gcs}/run"
    run(cfg, workdir)
    newest = [f for f in files_under(to_path(f"{workdir}/checkpoints/4/state")) if "/d/" in str(f)]
    target = max(newest, key=lambda f: f.stat().length)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    target.write_bytes(bytes(raw))
    messages: list[str] = []
    out = run(cfg, workdir, say=messages.append)
    assert out["resumed_from"] == 2 and out["step"] == 4, messages
    assert any("checkpoint step 4 is unreadable" in m for m in messages), messages
    bad = [f for f in files_under(to_path(f"{workdir}/checkpoints_bad"))]
    assert bad and all("/checkpoints_bad/4-" in str(f) for f in bad)


def test_when_no_step_restores_nothing_is_moved_and_a_rerun_is_refused_again(gcs, gcs_corpus):
    from asura.train.checkpoint import CheckpointError

    cfg = tiny_config(*TEXT, "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4",
                      f"data.path={gcs_corpus}")  # fmt: skip
    workdir = f"{gcs}/run"
    run(cfg, workdir)
    for f in files_under(to_path(f"{workdir}/checkpoints")):
        if "/d/" in str(f):
            f.write_bytes(b"garbage")
    before = sorted(str(f) for f in files_under(to_path(workdir)))
    for _ in range(2):
        with pytest.raises(CheckpointError, match="nothing was moved"):
            run(cfg, workdir)
        assert sorted(str(f) for f in files_under(to_path(workdir))) == before


def test_a_config_that_changes_the_maths_is_refused_before_anything_is_written(gcs, gcs_corpus):
    from asura.train.checkpoint import ConfigMismatchError

    cfg = tiny_config(*TEXT, "train.steps=2", "train.checkpoint_every=2", f"data.path={gcs_corpus}")
    workdir = f"{gcs}/run"
    run(cfg, workdir)
    before = {str(f): f.read_bytes() for f in files_under(to_path(workdir)) if "/checkpoints/" not in str(f)}
    with pytest.raises(ConfigMismatchError, match=r"model\.d_model"):
        run(tiny_config(*TEXT, "train.steps=2", "model.d_model=64", f"data.path={gcs_corpus}"), workdir)
    after = {str(f): f.read_bytes() for f in files_under(to_path(workdir)) if "/checkpoints/" not in str(f)}
    assert after == before  # no lock left, config and metrics untouched


def test_evaluate_generate_and_export_read_a_bucket_workdir(gcs, tmp_path):
    cfg = tiny_config("data.task=addition", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2")
    workdir = f"{gcs}/run"
    run(cfg, workdir)
    env = _env(tmp_path)
    ev = subprocess.run([sys.executable, "-m", "asura.evaluate", "--workdir", workdir, "--depths", "1-2",
                         "--json", str(tmp_path / "e.json")], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert [r["depth"] for r in json.loads((tmp_path / "e.json").read_text())["depths"]] == [1, 2]
    gen = subprocess.run([sys.executable, "-m", "asura.generate", "--workdir", workdir, "--depth", "2",
                          "--question", "5+7", "--max-new-tokens", "3"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert gen.returncode == 0 and "prompt '05+07='" in gen.stderr, gen.stderr[-2000:]
    # export from the bucket to a local directory; the export holds the bucket checkpoint's parameters
    from asura.io.export import ExportError, export, flat_params, load_export
    from asura.io.load import load

    done = export(workdir, tmp_path / "exp")
    assert done.step == 2
    ours, back = flat_params(load(workdir).model), flat_params(load_export(tmp_path / "exp").model)
    assert ours.keys() == back.keys() and all(ours[k].tobytes() == back[k].tobytes() for k in ours)
    with pytest.raises(ExportError, match="is not a local directory"):
        export(workdir, f"{workdir}/exp")


@pytest.mark.parametrize(
    ("workdir", "needle"),
    [
        ("gs://no-such-bucket-asura/run", "bucket not found (404)"),
        ("gs://asura-forbidden/run", "permission denied (403)"),
        ("s3://bucket/run", "the s3:// scheme is not supported"),
        ("gs://Not_A_Bucket/run", "not a gs://bucket/prefix path"),
    ],
)
def test_bad_bucket_paths_are_one_line_before_anything_compiles(gcs_server, workdir, needle, tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", workdir, *TINY], env=_env(tmp_path),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
    assert time.time() - t0 < 60 and not list(tmp_path.iterdir())[1:]  # only the data cache dir, if any


def test_a_missing_gcs_package_names_the_extra(monkeypatch):
    from asura.storage import paths

    monkeypatch.setattr(paths, "_installed", lambda module: module != "gcsfs")
    with pytest.raises(paths.StorageError, match=r"gs:// paths need gcsfs: pip install 'asura\[gcs\]'"):
        paths.to_path("gs://bucket/run")


@pytest.mark.slow  # a real train.py per process: CI runs it (.ci/run), `make test` does not
def test_two_processes_write_one_checkpoint_to_the_bucket_and_resume_from_it(gcs, tmp_path):
    """A two-process job (jax.distributed, one CPU device each) trains on a gs:// workdir: both write
    checkpoint 2 (each its own shards; process 0 alone the lock, config, metrics), stop, and both
    resume from it. The result equals the same job run straight bit for bit, and one process's
    straight run up to Adam's bound (another reduction order across processes: tests/test_parallel.py)."""
    import pickle

    from gcs_emulator import free_port
    from test_parallel import WORKER, adam_param_bound

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port, workdir = free_port(), f"{gcs}/run"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "bucket", str(rank), str(port), workdir,
                               str(tmp_path / f"r{rank}.pkl")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, str(WORKER), "bucket1", str(tmp_path / "single"),
                             str(tmp_path / "single.pkl")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    want = pickle.loads((tmp_path / "single.pkl").read_bytes())["params"]
    from parallel_worker import _bucket_cfg

    from asura.train.optim import lr_schedule

    cfg = _bucket_cfg()
    bound = adam_param_bound([float(lr_schedule(cfg.train)(i)) for i in range(cfg.train.steps)])
    for rank in (0, 1):
        got = pickle.loads((tmp_path / f"r{rank}.pkl").read_bytes())
        assert got["resumed_from"] == 2
        for k in want:
            # resumed from the bucket = the same job run straight, bit for bit
            np.testing.assert_array_equal(got["params"][k], got["straight"][k])
            assert np.max(np.abs(got["params"][k] - want[k])) <= bound, (rank, k)
    assert len([r for r in read_records(workdir) if "train/ce" in r]) == 4  # one writer: no duplicated records
    assert not to_path(f"{workdir}/.lock").exists()


def test_a_fine_tune_starts_from_a_bucket_run_and_refuses_an_uncommitted_step(gcs, tmp_path):
    """train.init_from=gs://...: the source is resolved as resume resolves it (the commit marker a
    bucket needs) and its parameters start the local run; the pinned step is the gs:// step path."""
    from asura.config import config_from_yaml
    from asura.train.init_from import InitFromError
    from asura.train.optim import lr_schedule

    src = f"{gcs}/src"
    source = run(tiny_config("data.task=addition", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"),
                 src)  # fmt: skip
    cfg = tiny_config("data.task=addition", "train.steps=3", "train.eval_every=100", f"train.init_from={src}",
                      "train.seed=7")  # fmt: skip
    assert float(lr_schedule(cfg.train)(0)) == 0.0  # warmup: step 1 leaves the parameters as they started
    out = run(cfg, tmp_path / "ft", hooks=stop_at(1))
    params_equal(out["params"], source["params"])
    assert config_from_yaml((tmp_path / "ft" / "config.yaml").read_text()).train.init_from == f"{src}/checkpoints/2"
    to_path(f"{src}/checkpoints/2/commit_success.txt").unlink()  # a save cut short on a bucket
    named = tiny_config("data.task=addition", "train.steps=3", f"train.init_from={src}/checkpoints/2")
    with pytest.raises(InitFromError, match="step 2 is not committed or has no readable config"):
        run(named, tmp_path / "ft2")
    assert not (tmp_path / "ft2").exists()
