"""The while-loop depth driver (model.loop=while, asura.model.dynamic_loop) against the unrolled
reference, for every remat policy: loss, per-iteration CE, latents and gradients, with traced depth
and truncation; one compiled program for every depth; and the scan driver kept equal to it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import ALL_ON, build, make_batch

from asura.model.dynamic_loop import dynamic_loop
from asura.model.remat import POLICIES

S = 5  # max_iterations: depths 1..5 share one program
CFG = dataclasses.replace(ALL_ON, iterations=3, max_iterations=S)
# fp32 computed in another order (while-loop custom VJP vs unrolled autodiff): ~10^2 ops in series
# per iteration over up to 5 iterations at u = 2^-24 on O(1) values: ~1e-5.
TOL = dict(rtol=1e-4, atol=1e-5)


@functools.cache
def _cached_reference(n, k):
    """The unrolled reference ignores model.remat and the loop driver (it runs the plain Python loop),
    and every policy's model has the same random parameters: one computation serves them all."""
    return _reference(build(CFG, 3), make_batch(4, packed=True), n, k)


def _reference(model, batch, n, k):
    """Unrolled Python loop, static n and k: loss, ce_per_iter, latents, grads."""
    graphdef, state = nnx.split(model)

    def loss(s):
        return nnx.merge(graphdef, s).loss(batch, n=n, bptt_k=k, unroll=True)

    (obj, aux), g = jax.value_and_grad(loss, has_aux=True)(state)
    h = model.latents(batch["inputs"], n=n, max_depth=S, unroll=True)
    return obj, aux["ce_per_iter"], h, g


@pytest.mark.parametrize("policy", list(POLICIES.names))
def test_while_driver_equals_unrolled_for_every_policy(policy):
    cfg = dataclasses.replace(CFG, remat=policy, loop="while")
    model = build(cfg, 3)
    batch = make_batch(4, packed=True)
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def run(s, n, k):
        traces.append(1)
        m = nnx.merge(graphdef, s)
        (obj, aux), g = jax.value_and_grad(lambda s_: nnx.merge(graphdef, s_).loss(batch, n=n, bptt_k=k), has_aux=True)(
            s
        )
        return obj, aux["ce_per_iter"], m.latents(batch["inputs"], n=n, max_depth=S), g

    for n, k in ((1, 0), (3, 0), (S, 0), (4, 2), (S, 1)):
        obj, ce, h, g = run(state, jnp.int32(n), jnp.int32(k))
        r_obj, r_ce, r_h, r_g = _cached_reference(n, k)
        np.testing.assert_allclose(obj, r_obj, **TOL, err_msg=f"{policy} n={n} k={k}")
        np.testing.assert_allclose(ce, r_ce, **TOL)  # NaN past n in both
        assert np.isnan(np.asarray(ce)[n:]).all()
        np.testing.assert_allclose(h, r_h, **TOL)  # rows past n repeat h_{n-1}
        np.testing.assert_array_equal(np.asarray(h)[n:], np.broadcast_to(np.asarray(h)[n - 1], np.asarray(h)[n:].shape))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r_g), strict=True):
            np.testing.assert_allclose(a, b, **TOL, err_msg=f"{policy} n={n} k={k}")
        if k:  # frozen slots (t < n - k) get exactly no gradient
            assert np.all(np.asarray(g["w_proj"][...])[: n - k] == 0)
            assert np.abs(np.asarray(g["w_proj"][...])[n - k : n]).max() > 0
        assert np.all(np.asarray(g["w_proj"][...])[n:] == 0)  # slots that never ran
    assert len(traces) == 1  # one program for every depth and truncation


def test_scan_driver_still_equals_while():
    """model.loop=scan (the lax.scan + switch driver) stays a correct fallback."""
    batch = make_batch(6)
    out = {}
    for loop in ("scan", "while"):
        model = build(dataclasses.replace(CFG, remat="iteration", loop=loop), 7)
        graphdef, state = nnx.split(model)
        fn = jax.jit(jax.value_and_grad(lambda s, n, g=graphdef: nnx.merge(g, s).loss(batch, n=n)[0]))
        out[loop] = fn(state, jnp.int32(2))
    np.testing.assert_allclose(out["scan"][0], out["while"][0], **TOL)
    for a, b in zip(jax.tree.leaves(out["scan"][1]), jax.tree.leaves(out["while"][1]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("store", ["residuals", "carries", "sqrt"])
def test_dynamic_loop_on_a_plain_recurrence(store):
    """A closed-form check of the driver alone: c_{t+1} = tanh(W c_t + b) * (t + 1), ys_t = sum(c_{t+1}),
    against a Python loop; rows past n hold skip_y(c_n) and pass their cotangent to c_n."""
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(size=(4, 4)) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=4), jnp.float32)
    c0 = jnp.asarray(rng.normal(size=4), jnp.float32)
    Smax = 7

    def via_driver(W, b, c0, n, lo):
        def step(c, t):
            c = jnp.tanh(W @ c + b) * (t + 1).astype(jnp.float32)
            return c, jnp.sum(c)

        c, ys = dynamic_loop(step, lambda c: 2.0 * jnp.sum(c), c0, n, Smax, store, lo)
        return jnp.sum(c**2) + jnp.sum(ys * jnp.arange(1.0, Smax + 1))

    def reference(W, b, c0, n, lo):
        c, ys = c0, []
        for t in range(n):
            c = jnp.tanh(W @ c + b) * (t + 1.0)
            if t < lo:
                c = jax.lax.stop_gradient(c)
            ys.append(jax.lax.stop_gradient(jnp.sum(c)) if t < lo else jnp.sum(c))
        ys += [2.0 * jnp.sum(c)] * (Smax - n)
        return jnp.sum(c**2) + jnp.sum(jnp.stack(ys) * jnp.arange(1.0, Smax + 1))

    grad = jax.jit(jax.value_and_grad(via_driver, argnums=(0, 1, 2)))
    for n, lo in ((1, 0), (4, 0), (Smax, 0), (5, 2), (Smax, 6)):
        v, g = grad(W, b, c0, jnp.int32(n), jnp.int32(lo))
        rv, rg = jax.value_and_grad(reference, argnums=(0, 1, 2))(W, b, c0, n, lo)
        # float32, ~10 tanh/matmul steps of O(1) values scaled by up to 7: relative 1e-5
        np.testing.assert_allclose(v, rv, rtol=1e-5)
        for a, r in zip(g, rg, strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=f"{store} n={n} lo={lo}")
        if lo:
            assert np.all(np.asarray(g[2]) == 0)  # frozen first steps: no gradient to c0


@pytest.mark.parametrize("policy", ["none", "iteration", "sqrt"])
def test_while_driver_under_an_enclosing_checkpoint_and_vmap(policy):
    """The model's loss inside the user's own jax.checkpoint, or vmapped over a batch of depths,
    equals the plain one. The driver's custom_vjp used to close over traced values (the depth,
    token ids): under jax.checkpoint they escaped their trace (UnexpectedTracerError)."""
    cfg = dataclasses.replace(CFG, remat=policy, loop="while")
    graphdef, state = nnx.split(build(cfg, 3))
    batch = make_batch(2, packed=True)

    def loss(s, n, k):
        return nnx.merge(graphdef, s).loss(batch, n=n, bptt_k=k)[0]

    plain = jax.jit(jax.value_and_grad(loss))  # one program for every (n, k)
    n, k = jnp.int32(4), jnp.int32(2)
    want = plain(state, n, k)
    got = jax.jit(jax.value_and_grad(jax.checkpoint(loss)))(state, n, k)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, **TOL, err_msg=policy)
    ns = jnp.array([1, 3, 5], jnp.int32)
    per_depth = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, None)))(state, ns, jnp.int32(0))
    for i, d in enumerate(ns):
        v, g = plain(state, d, jnp.int32(0))
        np.testing.assert_allclose(per_depth[0][i], v, **TOL, err_msg=f"{policy} vmap n={int(d)}")
        for a, b in zip(jax.tree.leaves(per_depth[1]), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(a[i], b, **TOL, err_msg=f"{policy} vmap n={int(d)}")


@pytest.mark.parametrize("store", ["residuals", "carries", "sqrt"])
def test_dynamic_loop_closing_over_integer_and_bool_values(store):
    """The step closes over traced int token ids and a bool mask as well as a float weight: under
    jax.checkpoint, in an eager grad of a vmap over the tokens, and vmapped over (n, lo), the
    gradient equals a Python loop's. (The old driver left the integer values closed over in its
    custom_vjp: UnexpectedTracerError under checkpoint and under the eager vmap.)"""
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(4, 4)) / 2, jnp.float32)
    c0 = jnp.asarray(rng.normal(size=4), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 9, size=(3, 4)), jnp.int32)
    mask = jnp.asarray([True, False, True, True])
    Smax = 6

    def update(W, c, tk, t):
        scale = jnp.where(mask, 1.0, 0.5) * (t + 1.0)
        return jnp.tanh(W @ c + 0.1 * tk.astype(jnp.float32)) * scale

    def via_driver(W, tk, n, lo):
        def step(c, t):
            c = update(W, c, tk, t)
            return c, jnp.sum(c)

        c, ys = dynamic_loop(step, lambda c: jnp.sum(c), c0, n, Smax, store, lo)
        return jnp.sum(c**2) + jnp.sum(ys * jnp.arange(1.0, Smax + 1))

    def reference(W, tk, n, lo):
        c, ys = c0, []
        for t in range(n):
            c = update(W, c, tk, t)
            if t < lo:
                c = jax.lax.stop_gradient(c)
            ys.append(jax.lax.stop_gradient(jnp.sum(c)) if t < lo else jnp.sum(c))
        ys += [jnp.sum(c)] * (Smax - n)
        return jnp.sum(c**2) + jnp.sum(jnp.stack(ys) * jnp.arange(1.0, Smax + 1))

    # float32, ~6 tanh/matmul steps of O(1) values scaled by up to 6: relative 1e-5
    tol = dict(rtol=1e-5, atol=1e-5)
    n, lo = 5, 2
    got = jax.jit(jax.grad(jax.checkpoint(via_driver)))(W, toks[0], jnp.int32(n), jnp.int32(lo))
    np.testing.assert_allclose(got, jax.grad(reference)(W, toks[0], n, lo), **tol, err_msg="checkpoint")

    got = jax.grad(lambda W: jax.vmap(lambda tk: via_driver(W, tk, jnp.int32(n), jnp.int32(0)))(toks).sum())(W)
    want = sum(jax.grad(reference)(W, tk, n, 0) for tk in toks)
    np.testing.assert_allclose(got, want, **tol, err_msg="eager grad of vmap over tokens")

    pairs = [(1, 0), (4, 3), (6, 1)]
    ns, los = (jnp.asarray(p, jnp.int32) for p in zip(*pairs, strict=True))
    got = jax.jit(jax.vmap(jax.grad(via_driver), in_axes=(None, None, 0, 0)))(W, toks[1], ns, los)
    for i, (n_i, lo_i) in enumerate(pairs):
        want = jax.grad(reference)(W, toks[1], n_i, lo_i)
        np.testing.assert_allclose(got[i], want, **tol, err_msg=f"vmap n={n_i} lo={lo_i}")
