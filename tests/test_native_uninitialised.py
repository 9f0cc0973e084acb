"""asura.native.uninitialised: CPU loop buffers without a zero fill, the same values, and the
GPU/TPU lowering untouched."""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asura.config.schema import ModelConfig
from asura.hlo import uninitialised_buffers
from asura.native import uninitialised


@pytest.fixture
def native():
    """The registered CPU handler. Skipped only without a C compiler: with one, a handler that does
    not build or register is a failure, not a skip."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH: the CPU buffers fall back to a zero fill")
    got = uninitialised.native()
    assert got.available, got.reason
    return got


def _rows_written(n, S=8):
    """Rows t < n of an S-row empty buffer, written in a while loop and read back."""

    def body(t, buf):
        return jax.lax.dynamic_update_index_in_dim(buf, jnp.full((3,), t, jnp.float32) * 1.5, t, 0)

    buf = jax.lax.fori_loop(0, n, body, uninitialised.empty((S, 3), jnp.float32))
    return jnp.where((jnp.arange(S) < n)[:, None], buf, -1.0)


def test_rows_written_read_back_exactly(native):
    f = jax.jit(_rows_written)
    text = f.lower(jnp.int32(3)).as_text()
    assert f"custom_call @{uninitialised.TARGET}" in text  # the CPU lowering is ours, not a zero fill
    want = np.full((8, 3), -1.0, np.float32)
    want[:3] = np.arange(3)[:, None] * 1.5
    np.testing.assert_array_equal(np.asarray(f(jnp.int32(3))), want)


def test_lowered_for_tpu_and_gpu_is_allocate_buffer():
    for platform in ("tpu", "cuda"):
        text = jax.jit(_rows_written).trace(jnp.int32(3)).lower(lowering_platforms=(platform,)).as_text()
        assert "AllocateBuffer" in text, platform
        assert uninitialised.TARGET not in text, platform


def _fills(hlo: str, S: int) -> set[tuple[int, ...]]:
    """Shapes of the S-row arrays an instruction fills with a constant (a zero-filled buffer)."""
    pat = re.compile(rf"%\S+ = \w+\[({S},[^\]]*)\]\S* (?:broadcast|fusion)\(%constant[\w.\-]*\)")
    return {tuple(int(d) for d in m.group(1).split(",")) for m in pat.finditer(hlo)}


def _model_step_hlo(S: int) -> tuple[str, set[tuple[int, ...]]]:
    """The compiled CPU value_and_grad of a remat-none model, and its parameters' shapes."""
    from asura.model.looped import LoopedLM

    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, iterations=2, max_iterations=S,
                      remat="none", loop="while")  # fmt: skip
    graphdef, state = nnx.split(LoopedLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32),
             "loss_mask": jnp.ones((2, 16), jnp.float32)}  # fmt: skip

    def objective(s):
        return nnx.merge(graphdef, s).loss(batch, n=jnp.int32(2))[0]

    hlo = jax.jit(jax.value_and_grad(objective)).lower(state).compile().as_text()
    return hlo, {tuple(x.shape) for x in jax.tree.leaves(state)}


def test_model_loop_buffers_are_not_zero_filled(native, monkeypatch):
    S = 8
    hlo, params = _model_step_hlo(S)
    buffers = uninitialised_buffers(hlo)
    assert buffers.uninitialised > 0 and buffers.copied == 0, buffers
    # The only S-row zeros left are gradient accumulators of per-iteration parameters (W_proj,
    # per-iteration norms: S rows by definition), not loop buffers.
    assert _fills(hlo, S) <= params, _fills(hlo, S) - params
    # The check sees the fills when the buffers come from jax.lax.empty (zeros on the CPU).
    monkeypatch.setattr(uninitialised, "native", lambda: uninitialised.Native(False, "test"))
    hlo, params = _model_step_hlo(S)
    assert uninitialised_buffers(hlo).uninitialised == 0
    assert _fills(hlo, S) - params


def test_build_is_cached_and_a_failing_compiler_falls_back(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH")
    built = uninitialised.locate([tmp_path])
    assert built.available and built.library.parent == tmp_path, built
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert uninitialised.locate([tmp_path]) == built  # cached: the compiler is not run again
    failed = uninitialised.locate([tmp_path / "fresh"])
    assert not failed.available and "false exited 1" in failed.reason, failed
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    missing = uninitialised.locate([tmp_path / "fresh2"])
    assert not missing.available and "no-such-cc" in missing.reason, missing
    assert not list((tmp_path / "fresh").glob("*.tmp"))  # a failed build leaves no partial file


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(uninitialised.ENV, "0")
    got = uninitialised.native.__wrapped__()
    assert not got.available and got.reason == f"{uninitialised.ENV}=0"
