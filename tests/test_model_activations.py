"""asura.model.activations: jax.nn's forward values, derivatives as accurate as jax.nn's autodiff,
forward mode and second derivatives intact, and fewer [.., F] residuals kept by the MLP."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.activations import gelu_tanh, swiglu
from asura.model.layers import MLP

C, A = np.sqrt(2 / np.pi), 0.044715  # jax.nn.gelu's tanh approximation


def jax_gelu(u):
    return jax.nn.gelu(u, approximate=True)


def jax_swiglu(g, up):
    return jax.nn.silu(g) * up


def gelu_prime_64(u):
    """d gelu_tanh / du in float64, by hand."""
    t = np.tanh(C * (u + A * u**3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * C * (1 + 3 * A * u**2)


def gelu_second_64(u):
    """d² gelu_tanh / du² in float64, by hand."""
    x, dx, ddx = C * (u + A * u**3), C * (1 + 3 * A * u**2), C * 6 * A * u
    t = np.tanh(x)
    dt = (1 - t * t) * dx
    ddt = -2 * t * dt * dx + (1 - t * t) * ddx
    return dt + 0.5 * u * ddt


def max_err(got, ref64):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref64)))


U = np.linspace(-10, 10, 20001).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_values_are_jax_nn_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    u, g, up = (jnp.asarray(rng.standard_normal(4096) * 4, dtype) for _ in range(3))
    assert jnp.array_equal(gelu_tanh(u), jax_gelu(u))
    assert jnp.array_equal(swiglu(g, up), jax_swiglu(g, up))
    # the primal out of the linearisation is the same value too
    assert jnp.array_equal(jax.jvp(gelu_tanh, (u,), (jnp.ones_like(u),))[0], jax_gelu(u))
    assert jnp.array_equal(jax.jvp(swiglu, (g, up), (g, up))[0], jax_swiglu(g, up))


def test_gelu_derivatives_as_accurate_as_autodiff():
    """Against float64 by hand, each fp32 derivative may be off by no more than twice the error of
    jax.nn.gelu's own autodiff on the same grid: the same formula, its fp32 ops in another order."""
    ref1, ref2 = gelu_prime_64(U.astype(np.float64)), gelu_second_64(U.astype(np.float64))
    first = lambda f: jax.vmap(jax.grad(f))(U)
    second = lambda f: jax.vmap(jax.grad(jax.grad(f)))(U)
    assert max_err(first(gelu_tanh), ref1) <= 2 * max_err(first(jax_gelu), ref1)
    assert max_err(second(gelu_tanh), ref2) <= 2 * max_err(second(jax_gelu), ref2)
    # forward mode (a custom_vjp could not): the tangent is the same derivative
    _, tangent = jax.jvp(gelu_tanh, (jnp.asarray(U),), (jnp.ones_like(U),))
    assert max_err(tangent, ref1) <= 2 * max_err(first(jax_gelu), ref1)


def test_swiglu_derivatives_as_accurate_as_autodiff():
    rng = np.random.default_rng(1)
    g, up = (jnp.asarray(rng.standard_normal(20000) * 4, jnp.float32) for _ in range(2))
    g64, up64 = np.asarray(g, np.float64), np.asarray(up, np.float64)
    s = 1 / (1 + np.exp(-g64))
    refs = (s * (1 + g64 * (1 - s)) * up64, g64 * s)  # d/dgate, d/dup
    ours = jax.vmap(jax.grad(swiglu, argnums=(0, 1)))(g, up)
    theirs = jax.vmap(jax.grad(jax_swiglu, argnums=(0, 1)))(g, up)
    for a, b, ref in zip(ours, theirs, refs, strict=True):
        assert max_err(a, ref) <= 2 * max_err(b, ref)
    # second order through the rule: d²/dgate dup = silu'(gate)
    mixed = jax.vmap(jax.grad(jax.grad(swiglu, argnums=0), argnums=1))(g, up)
    np.testing.assert_allclose(mixed, s * (1 + g64 * (1 - s)), rtol=1e-6, atol=1e-6)  # a few fp32 ops on O(1)


@pytest.mark.parametrize("mlp, kept", [("gelu", 2), ("swiglu", 3)])
def test_mlp_keeps_fewer_hidden_residuals(mlp, kept):
    """The MLP's pullback keeps `kept` [B, T, F] arrays: the down projection's input, and the
    derivative (gelu'; silu'·up and silu). jax.nn under autodiff keeps 5 (gelu) and 6 (swiglu)."""
    B, T, D, F = 2, 3, 8, 32
    cfg = dataclasses.replace(ModelConfig(vocab_size=16, d_model=D, n_heads=2, n_layers=1), mlp=mlp, d_ff=F)
    model = MLP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x_BTD = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, D)), jnp.float32)
    _, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p)(x_BTD), params)
    hidden = [leaf for leaf in jax.tree.leaves(pullback) if leaf.size == B * T * F]
    assert len(hidden) == kept, [leaf.shape for leaf in hidden]
