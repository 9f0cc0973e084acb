"""No silent clamp of the depth: a depth outside 1..S is an error when it is known, NaN when traced.

The per-iteration parameters are indexed by the loop step, and the loop length S is static, so a
traced n past S cannot run at its depth. It used to run min(n, S) silently (logits of depth 4 for a
requested 6); now every output is NaN, and a concrete n (Python or jax scalar) is checked at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_parity import ALL_ON, build, make_batch

from asura.depth import DepthError

M = 4
CFG = dataclasses.replace(ALL_ON, iterations=3, max_iterations=M)


@pytest.fixture(scope="module", params=["while", "scan"])
def model(request):
    return build(dataclasses.replace(CFG, loop=request.param), 3)


def test_concrete_jax_depth_past_max_iterations_is_refused_or_extrapolated():
    tokens = make_batch(2)["inputs"]
    model = build(CFG, 3)
    with pytest.raises(DepthError, match=r"exceeds model\.max_iterations=4"):
        model(tokens, n=jnp.int32(6))  # a concrete jax scalar is checked like the int 6
    with pytest.raises(ValueError, match="depth n must be >= 1"):
        model(tokens, n=jnp.int32(0))
    last = build(dataclasses.replace(CFG, extrapolation="last"), 3)
    np.testing.assert_array_equal(np.asarray(last(tokens, n=jnp.int32(6))), np.asarray(last(tokens, n=6)))
    assert not np.array_equal(np.asarray(last(tokens, n=6)), np.asarray(last(tokens, n=M)))


@pytest.mark.parametrize("n", [0, M + 2, -1])
def test_traced_depth_outside_the_loop_gives_nan_not_a_clamped_depth(model, n):
    batch = make_batch(2)
    logits = jax.jit(lambda n_: model(batch["inputs"], n=n_))(jnp.int32(n))
    assert np.isnan(np.asarray(logits)).all()
    objective, aux = jax.jit(lambda n_: model.loss(batch, n=n_))(jnp.int32(n))
    assert np.isnan(float(objective)) and np.isnan(float(aux["ce"]))
    h = jax.jit(lambda n_: model.latents(batch["inputs"], n=n_))(jnp.int32(n))
    assert np.isnan(np.asarray(h)).all()


@pytest.mark.parametrize("n", [1, 3, M])
def test_traced_depth_inside_the_loop_is_unchanged(model, n):
    tokens = make_batch(2)["inputs"]
    traced = jax.jit(lambda n_: model(tokens, n=n_))(jnp.int32(n))
    # fp32: the same ops in one program (traced n) vs another (static n) may fuse differently
    np.testing.assert_allclose(np.asarray(traced), np.asarray(model(tokens, n=n)), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(traced)).all()


def test_kv_cached_decoding_gives_nan_for_a_traced_depth_outside_its_cache(model):
    from asura.infer.cache import init_cache, prefill

    tokens = make_batch(2)["inputs"][:, :8]
    cache = init_cache(model, tokens.shape[0], 16)  # S = max_iterations = 4
    step = jax.jit(lambda c, n_: prefill(model, c, tokens, n_))
    assert np.isnan(np.asarray(step(cache, jnp.int32(M + 2)).logits_BCV)).all()
    assert np.isfinite(np.asarray(step(cache, jnp.int32(M)).logits_BCV)).all()
    with pytest.raises(ValueError, match=r"outside the cache's 1\.\.4"):
        prefill(model, cache, tokens, M + 2)  # a concrete depth is refused at once
