"""Loading models from workdirs written in the train package's checkpoint format."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import DEMO, ROOT, tiny_config

from asura.config import config_to_yaml
from asura.io import load
from asura.train.checkpoint import CheckpointStore, config_meta
from asura.train.integrity import CHECKSUMS
from asura.train.state import init_state

# On top of TINY (and demo.yaml): demo's heads and sequence length, 4 rows.
EXTRA = ("model.n_heads=4", "data.seq_len=64", "train.batch_size=4")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Steps 1 and 2 saved with CheckpointStore (step 2's params are step 1's + 1)."""
    cfg = tiny_config(*EXTRA, base=DEMO)
    wd = tmp_path_factory.mktemp("wd")
    (wd / "config.yaml").write_text(config_to_yaml(cfg))
    state = init_state(cfg).state
    store = CheckpointStore(wd / "checkpoints", keep=3, async_save=False)
    store.save(1, state, {}, config_meta(cfg, 1))
    state2 = {**state, "params": jax.tree.map(lambda x: x + 1.0, state["params"])}
    store.save(2, state2, {}, config_meta(cfg, 2))
    store.close()
    return wd, cfg, state["params"]


def _embed(model):
    return np.asarray(model.embed[...])


def test_load_latest_and_given_step(workdir):
    wd, cfg, params1 = workdir
    latest = load.load(wd)
    assert latest.step == 2 and latest.cfg == cfg and latest.workdir == wd.resolve()
    np.testing.assert_array_equal(_embed(latest.model), np.asarray(params1["embed"]) + 1.0)
    for got in (
        load.load(wd, step=1),
        load.load(wd / "checkpoints" / "1", step=1),
        load.load(wd / "checkpoints", step=1),
    ):
        assert got.step == 1
        np.testing.assert_array_equal(_embed(got.model), np.asarray(params1["embed"]))
    np.testing.assert_array_equal(_embed(load.model_from_params(cfg, params1)), np.asarray(params1["embed"]))


def test_step_directory_path_selects_that_step(workdir):
    wd, _, params1 = workdir
    got = load.load(wd / "checkpoints" / "1")
    assert got.step == 1
    np.testing.assert_array_equal(_embed(got.model), np.asarray(params1["embed"]))


def test_load_errors(workdir, tmp_path):
    wd, wd_cfg, _ = workdir
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "has no checkpoints"),  # the config comes from each checkpoint, not config.yaml
        (wd / "config.yaml", "is not a directory"),
    ]
    for path, msg in cases:
        with pytest.raises(load.LoadError, match=msg):
            load.load(path)
    with pytest.raises(load.LoadError, match=r"step 7 not found .*available: \[1, 2\]"):
        load.load(wd, step=7)
    bad = tmp_path / "bad"  # a checkpoint whose own config does not validate
    store = CheckpointStore(bad / "checkpoints", keep=3, async_save=False)
    meta = {**config_meta(wd_cfg, 1), "config_yaml": "model: {d_modle: 3}\n"}
    store.save(1, init_state(wd_cfg).state, {}, meta)
    store.close()
    with pytest.raises(load.LoadError, match=r"step 1 .*no valid config.*d_modle"):
        load.load(bad, step=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((wd / "config.yaml").read_text())
    with pytest.raises(load.LoadError, match="has no checkpoints"):
        load.load(empty)


def test_an_unreadable_step_falls_back_read_only(workdir, tmp_path):
    """Latest: an unreadable newest step is skipped with a warning and the previous one loads,
    nothing moved (analysis is read-only); named explicitly, it is a one-line LoadError."""
    import shutil

    wd, _, params1 = workdir
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy)
    step2 = copy / "checkpoints" / "2"
    victim = max((p for p in step2.rglob("*") if p.is_file() and p.name != CHECKSUMS),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, other bytes: only the checksum tells
    warnings = []
    got = load.load(copy, warn=warnings.append)
    assert got.step == 1
    np.testing.assert_array_equal(_embed(got.model), np.asarray(params1["embed"]))
    assert len(warnings) == 1 and "step 2 is unreadable" in warnings[0] and "checksum" in warnings[0]
    assert step2.is_dir() and not (copy / "checkpoints_bad").exists()
    with pytest.raises(load.LoadError, match=r"checkpoint step 2 in .* does not restore: .*checksum"):
        load.load(copy, step=2)


def test_read_only_loads_print_no_orbax_read_only_notices(workdir):
    """Loading twice in a fresh process (as a notebook or `asura.sweep extrapolate` does): orbax's notices
    that the read-only store is read-only are gone, and any other absl warning still shows."""
    wd, _, _ = workdir
    code = (
        "from absl import logging\n"
        "from asura.io.load import load\n"
        f"load({str(wd)!r}); load({str(wd)!r})\n"
        "logging.warning('another absl warning')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not [line for line in p.stderr.splitlines() if "read only" in line or "read_only" in line], p.stderr
    assert "another absl warning" in p.stderr
