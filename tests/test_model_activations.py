"""asura.model.activations: the forward values of the expressions they replace, derivatives as
accurate as those expressions' autodiff, forward mode and second derivatives intact, and fewer
residuals kept by the MLP, the attention softmax and the norms."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.activations import gelu_tanh, masked_softmax, normalize, swiglu
from asura.model.attention import xla_attention
from asura.model.layers import MLP, Norm

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


def test_rules_equal_autodiff_in_float64_and_take_python_scalars():
    """In float64 the rules are the plain expressions' derivatives to fp64 rounding (a wrong
    constant shows far above 1e-12); forward mode takes a Python scalar as jax.nn.gelu does."""
    with jax.enable_x64(True):
        u = jnp.asarray(U, jnp.float64)
        for order in (jax.grad, lambda f: jax.grad(jax.grad(f))):
            np.testing.assert_allclose(jax.vmap(order(gelu_tanh))(u), jax.vmap(order(jax_gelu))(u), rtol=1e-12,
                                       atol=1e-12)  # fmt: skip
        g, up = u[::7], u[::-7]
        ours = jax.vmap(jax.grad(swiglu, argnums=(0, 1)))(g, up)
        theirs = jax.vmap(jax.grad(jax_swiglu, argnums=(0, 1)))(g, up)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for f in (jax.grad, jax.jacfwd, jax.hessian):  # fp32: the same derivative in another op order, ~10 ulp
        np.testing.assert_allclose(f(gelu_tanh)(1.0), f(jax_gelu)(1.0), rtol=1e-6)
    assert jax.jvp(swiglu, (1.0, 2.0), (1.0, 1.0))[1] == pytest.approx(jax.jvp(jax_swiglu, (1.0, 2.0), (1.0, 1.0))[1])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_derivatives_as_accurate_as_autodiff(dtype):
    """In bf16/f16 the rules compute in the input's dtype as autodiff does: same gradient dtype,
    and an error against float64 no worse than twice the plain autodiff's."""
    u = jnp.asarray(U[np.abs(U) < 8], dtype)  # f16 overflows u³ beyond ~40
    ref = gelu_prime_64(np.asarray(u, np.float64))
    ours, theirs = jax.vmap(jax.grad(gelu_tanh))(u), jax.vmap(jax.grad(jax_gelu))(u)
    assert ours.dtype == theirs.dtype == dtype
    assert max_err(ours, ref) <= 2 * max_err(theirs, ref)
    g, up = u[::3], u[::-3]
    g64, up64 = np.asarray(g, np.float64), np.asarray(up, np.float64)
    s = 1 / (1 + np.exp(-g64))
    refs = (s * (1 + g64 * (1 - s)) * up64, g64 * s)
    ours = jax.vmap(jax.grad(swiglu, argnums=(0, 1)))(g, up)
    theirs = jax.vmap(jax.grad(jax_swiglu, argnums=(0, 1)))(g, up)
    for a, b, ref in zip(ours, theirs, refs, strict=True):
        assert a.dtype == b.dtype == dtype
        assert max_err(a, ref) <= 2 * max_err(b, ref)


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


def old_masked_softmax(s, mask):
    """xla_attention's masked softmax before asura.model.activations."""
    return jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1), 0.0)


def old_normalize(x, centre, eps):
    """Norm's normalisation before asura.model.activations."""
    if centre:
        x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _softmax_inputs(dtype):
    """Scores with a causal mask, one segment boundary and one fully masked row."""
    rng = np.random.default_rng(3)
    T = 12
    s = jnp.asarray(rng.standard_normal((2, 3, T, T)) * 3, dtype)
    seg = np.repeat([0, 1], T // 2)
    mask = np.tril(np.ones((T, T), bool)) & (seg[:, None] == seg[None, :])
    mask[5] = False  # a row with no visible key
    g = jnp.asarray(rng.standard_normal(s.shape), dtype)
    return s, jnp.asarray(mask)[None, None], g


def _vjp(f, x, g):
    return jax.vjp(f, x)[1](g)[0]


def test_masked_softmax_and_normalize_forward_bit_for_bit():
    s, mask, _ = _softmax_inputs(jnp.float32)
    assert jnp.array_equal(masked_softmax(s, mask), old_masked_softmax(s, mask))
    assert not jnp.any(masked_softmax(s, mask)[:, :, 5])  # the fully masked row is zeros, not NaN
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 16)) * 2 + 1, jnp.float32)
    for centre in (True, False):
        assert jnp.array_equal(normalize(x, centre, 1e-5), old_normalize(x, centre, 1e-5))


def test_masked_softmax_gradient_as_accurate_as_autodiff():
    """fp32 gradient against the float64 autodiff of the old expression: no worse than twice the
    fp32 autodiff's error (the same softmax algebra in another order); in float64 the two agree
    to fp64 rounding on O(1) values."""
    s, mask, g = _softmax_inputs(jnp.float32)
    ours = _vjp(lambda s: masked_softmax(s, mask), s, g)
    theirs = _vjp(lambda s: old_masked_softmax(s, mask), s, g)
    assert not jnp.any(ours[:, :, 5]) and not jnp.any(jnp.where(mask, 0, ours))  # nothing flows to masked scores
    with jax.enable_x64(True):
        s64, g64 = jnp.asarray(s, jnp.float64), jnp.asarray(g, jnp.float64)
        ref = np.asarray(_vjp(lambda s: old_masked_softmax(s, mask), s64, g64))
        ours64 = _vjp(lambda s: masked_softmax(s, mask), s64, g64)
        np.testing.assert_allclose(ours64, ref, rtol=1e-12, atol=1e-12)
    assert max_err(ours, ref) <= 2 * max_err(theirs, ref)


@pytest.mark.parametrize("centre", [True, False], ids=["layernorm", "rmsnorm"])
def test_normalize_derivatives_as_accurate_as_autodiff(centre):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 7, 32)) * 3 + 2, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = _vjp(lambda x: normalize(x, centre, 1e-5), x, g)
    theirs = _vjp(lambda x: old_normalize(x, centre, 1e-5), x, g)
    _, tangent = jax.jvp(lambda x: normalize(x, centre, 1e-5), (x,), (g,))  # forward mode
    with jax.enable_x64(True):
        x64, g64 = jnp.asarray(x, jnp.float64), jnp.asarray(g, jnp.float64)
        ref = np.asarray(_vjp(lambda x: old_normalize(x, centre, 1e-5), x64, g64))
        ref_t = np.asarray(jax.jvp(lambda x: old_normalize(x, centre, 1e-5), (x64,), (g64,))[1])
        # second order: the gradient of <g, d normalize(x)> in x, through the rule
        hvp = lambda f: jax.grad(lambda x: jnp.vdot(g64, _vjp(lambda x: f(x, centre, 1e-5), x, g64)))(x64)
        # fp64 through two differentiations of x / sigma with |x| ~ 5: ~1e4 ulp, far below a wrong term
        np.testing.assert_allclose(hvp(normalize), hvp(old_normalize), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_vjp(lambda x: normalize(x, centre, 1e-5), x64, g64), ref, rtol=1e-12, atol=1e-12)
    assert max_err(ours, ref) <= 2 * max_err(theirs, ref)
    assert max_err(tangent, ref_t) <= 2 * max_err(
        jax.jvp(lambda x: old_normalize(x, centre, 1e-5), (x,), (g,))[1], ref_t
    )


def test_attention_and_norm_keep_fewer_residuals():
    """xla_attention's pullback keeps one f32 [.., T, S] array (p; the [B, K, G·T, S] form the PV
    matmul reads is its reshape) and no boolean mask; the old softmax kept the masked scores, their
    exponentials and two masks besides. A Norm keeps one [.., D] array (x̂), not x - mean as well."""
    B, T, N, H = 2, 16, 4, 8
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat([[1, 2]], T // 2, axis=1).reshape(1, T).repeat(B, 0))
    _, pullback = jax.vjp(lambda q, k, v: xla_attention(q, k, v, segment_ids_BT=seg), q, k, v)
    leaves = jax.tree.leaves(pullback)
    assert not [x.shape for x in leaves if x.dtype == jnp.bool_ and x.size >= T * T]
    scores = [x.shape for x in leaves if x.size == B * N * T * T]
    assert len(scores) == 2, scores
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1)
    graphdef, params = nnx.split(Norm(cfg, 32, rngs=nnx.Rngs(0)))
    x = jnp.asarray(rng.standard_normal((B, T, 32)), jnp.float32)
    _, pullback = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)  # x varies, as in a block
    assert len([leaf for leaf in jax.tree.leaves(pullback) if leaf.size == B * T * 32]) == 1
