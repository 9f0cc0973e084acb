"""asura.native.uninitialised: CPU loop buffers without a zero fill, the same values, and the
GPU/TPU lowering untouched."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys

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
    if shutil.which(uninitialised._compiler()[0]) is None:
        pytest.skip(f"no C compiler ({uninitialised._compiler()[0]}) on PATH: the CPU buffers are zero-filled")
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


def test_lowered_for_tpu_and_gpu_is_allocate_buffer(native):
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


def test_build_is_cached_and_a_failing_compiler_falls_back(native, tmp_path, monkeypatch):
    built = uninitialised.locate([tmp_path])
    assert built.available and built.library.parent == tmp_path, built
    mtime = built.library.stat().st_mtime_ns
    assert uninitialised.locate([tmp_path]) == built and built.library.stat().st_mtime_ns == mtime  # not rebuilt
    # The compiler is part of the cache key: a failing one is not hidden by the cached library.
    monkeypatch.setenv("CC", "false")
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


def test_a_directory_others_can_write_is_refused(native, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # mkdir's mode is masked by the umask
    refused = uninitialised.locate([shared])
    assert not refused.available and "not private" in refused.reason, refused
    assert not list(shared.iterdir())  # nothing was built there
    private = tmp_path / "private"
    got = uninitialised.locate([shared, private])
    assert got.available and got.library.parent == private, got


def test_a_broken_cached_library_is_rebuilt(native, tmp_path):
    cache = tmp_path / "asura" / "native"
    cache.mkdir(parents=True, mode=0o700)
    junk = uninitialised.library(cache)
    junk.write_bytes(b"not a shared library")
    code = "from asura.native import uninitialised as u; n = u.native(); print(n.available, n.library)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", str(junk)], out.stdout + out.stderr[-2000:]
    assert junk.read_bytes()[:4] == b"\x7fELF" or sys.platform == "darwin"


def test_several_cpu_devices_get_the_zero_fill(native):
    """With several CPU devices the partitioner would give the custom call its global shape on every
    device and slice it afterwards (more memory than the fill it saves): jax.lax.empty there."""
    code = (
        "import jax, jax.numpy as jnp; from asura.native import uninitialised as u; "
        "f = jax.jit(lambda: u.empty((4, 3), jnp.float32)); print(len(jax.devices()), u.TARGET in f.lower().as_text())"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr[-2000:]


def test_debug_nans_gets_the_zero_fill(native):
    with jax.debug_nans(True):  # a fresh function: jit's trace cache would return an earlier lowering
        text = jax.jit(lambda n: _rows_written(n)).lower(jnp.int32(3)).as_text()
    assert uninitialised.TARGET not in text  # uninitialised memory may hold NaN bit patterns


@pytest.mark.parametrize("policy", ["none", "block", "iteration", "sqrt"])
def test_rows_of_skipped_steps_are_never_read(policy, monkeypatch):
    """With every loop buffer poisoned (NaN, or -1 for integers) the loss, per-iteration CE, latents
    and gradients are bit-identical to zero-filled buffers: rows t >= n (and, truncated, t < lo) are
    never read, only written or selected away. Fresh memory is often zeros, so this poison is what
    would show a read of an unwritten row."""
    from test_model_parity import ALL_ON, build, make_batch

    dl = importlib.import_module("asura.model.dynamic_loop")  # the module, not the function of that name
    cfg = dataclasses.replace(ALL_ON, iterations=3, max_iterations=5, remat=policy, loop="while")
    model = build(cfg, 3)
    batch = make_batch(2, packed=True)
    graphdef, state = nnx.split(model)

    def fill(value):
        def empty(shape, dtype, sharding=None):
            v = value if jnp.issubdtype(dtype, jnp.floating) else -1
            return jnp.full(shape, v, dtype)

        return empty

    def program():
        """value_and_grad and the latents, compiled once for every (n, k): the depth is traced."""

        def go(s, n, k):
            (obj, aux), g = jax.value_and_grad(
                lambda s_: nnx.merge(graphdef, s_).loss(batch, n=n, bptt_k=k), has_aux=True
            )(s)
            return obj, aux["ce_per_iter"], nnx.merge(graphdef, s).latents(batch["inputs"], n=n, max_depth=5), g

        # compiled now, while this fill is patched in (jax.jit alone would trace at the first call)
        return jax.jit(go).lower(state, jnp.int32(1), jnp.int32(0)).compile()

    monkeypatch.setattr(dl, "empty", fill(0.0))
    zeros = program()
    monkeypatch.setattr(dl, "empty", fill(jnp.nan))
    poisoned = program()
    for n, k in ((1, 0), (3, 0), (4, 2)):
        want = zeros(state, jnp.int32(n), jnp.int32(k))
        got = poisoned(state, jnp.int32(n), jnp.int32(k))
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{policy} n={n} k={k}")
        assert np.isfinite(np.asarray(got[0]))
