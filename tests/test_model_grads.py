"""Gradients and guidance: ABBA Khatri–Rao path, streamed/chunked latent guidance vs stored
logits, guidance weights per mode against hand values, truncated backprop, a float64
finite-difference check, and the parameters' logical axis names."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import ALL_ON, build, make_batch

from asura.config.schema import ModelConfig
from asura.model import LoopedLM
from asura.model.adapters import ABBA, LoRA
from asura.model.loss import guidance_weights, scores

# Streamed/chunked/scanned vs stored-logit/unrolled references: the same fp32 math summed in
# another order (vocabulary chunks, online logsumexp, scan vs Python loop). Values: ~10^2 ops in
# series on O(1) losses, a few 1e-6. Gradients go back through every iteration and the chunked
# CE twice over, so small entries carry relatively more rounding: 1e-4 relative, 1e-6 absolute.
TOL = dict(rtol=2e-5, atol=2e-5)


def _grad_close(g, ref, rtol=1e-4, atol=1e-6):
    flat_g, flat_r = jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(ref)
    for (path, a), b in zip(flat_g, flat_r, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_abba_khatri_rao_equals_materialised():
    cfg = dataclasses.replace(ALL_ON, adapter_rank=3, adapter_rank2=2, adapter_gamma=0.7)
    rng = np.random.default_rng(0)
    ad = nnx.eval_shape(lambda: ABBA(cfg, 8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0)))
    state = nnx.state(ad, nnx.Param)
    nnx.update(ad, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), state))
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    for t in range(cfg.max_iterations):
        dw = ad.delta_w(t)
        # materialise by hand from the factors, independent of delta_w's formula
        u1, u2, v1, v2 = (np.asarray(p[...][t], np.float64) for p in (ad.u1, ad.u2, ad.v1, ad.v2))
        want = 0.7 * (u1 @ v1) * (u2 @ v2)
        np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ad(x, t), x @ dw, rtol=1e-5, atol=1e-5)
        assert np.linalg.matrix_rank(want) == min(8, 5, 3 * 2)  # rank up to r1*r2, above r1 and r2


def test_adapters_start_at_zero_but_train():
    cfg = dataclasses.replace(ALL_ON, adapter_rank=2, adapter_rank2=2)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    c = jax.random.normal(jax.random.key(1), (4, 6))
    for cls in (ABBA, LoRA):
        ad = cls(cfg, 8, 6, ("embed", "mlp"), rngs=nnx.Rngs(0))
        assert all(float(jnp.abs(ad.delta_w(t)).max()) == 0.0 for t in range(cfg.max_iterations))
        g = nnx.grad(lambda m: jnp.sum(m(x, 1) * c))(ad)
        zero_factor = g.v1 if cls is ABBA else g.v
        assert float(jnp.abs(zero_factor[...][1]).max()) > 1e-3  # the zero factor gets a gradient
        assert float(jnp.abs(zero_factor[...][0]).max()) == 0.0  # only at the slot used


def naive_loss(model, batch, n, weights):
    """Stored logits for every iteration, full vocabulary, weights given by hand."""
    h_SBTD = model.latents(batch["inputs"], n=n, unroll=True)
    mask = batch["loss_mask"]
    total = 0.0
    for t in range(n):
        logits = model.head(h_SBTD[t])
        lse = jax.nn.logsumexp(logits, -1)
        ce = lse - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        total += weights[t] * ((ce * mask).sum() + model.cfg.z_loss * (lse**2 * mask).sum()) / mask.sum()
    return total


def test_streamed_chunked_guidance_matches_stored_logits():
    cfg = dataclasses.replace(
        ALL_ON, guidance="explicit", guidance_weights=(0.2, 0.3, 0.5), ce_chunk=8, adapter="none", qk_norm=False
    )
    model = build(cfg, 11)
    batch = make_batch(12)
    graphdef, state = nnx.split(model)
    n = 2
    weights = [0.2 / 0.5, 0.3 / 0.5]  # renormalised over the first n

    @jax.jit
    def streamed(state, n):
        return jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=n)[0])(state)

    @jax.jit
    def naive(state):
        return jax.value_and_grad(lambda s: naive_loss(nnx.merge(graphdef, s), batch, n, weights))(state)

    (l1, g1), (l2, g2) = streamed(state, jnp.int32(n)), naive(state)
    np.testing.assert_allclose(l1, l2, **TOL)
    _grad_close(g1, g2)


def test_truncated_backprop():
    model = build(dataclasses.replace(ALL_ON, adapter="none", qk_norm=False), 21)
    batch = make_batch(22)
    graphdef, state = nnx.split(model)
    n, k = 3, 1

    @jax.jit
    def trunc(state, n, k):  # n and k both traced
        return jax.grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=n, bptt_k=k)[0])(state)

    def manual(state):
        """Unrolled loop with explicit stop_gradient on every output of iterations t < n-k."""
        m = nnx.merge(graphdef, state)
        e = m.embed[...][batch["inputs"]]
        pos = jnp.broadcast_to(jnp.arange(e.shape[1]), e.shape[:2])
        w = np.arange(1, n + 1) / np.arange(1, n + 1).sum()  # linear guidance
        h, total = e, 0.0
        for t in range(n):
            h = m.iteration(h, e, t, pos, None)
            ce, z, _ = scores(m.final_norm(h), m.w_DV(), batch["targets"], batch["loss_mask"])
            term = w[t] * (ce + m.cfg.z_loss * z)
            if t < n - k:
                h, term = jax.lax.stop_gradient(h), jax.lax.stop_gradient(term)
            total += term
        return total

    g = trunc(state, jnp.int32(n), jnp.int32(k))
    _grad_close(g, jax.jit(jax.grad(manual))(state))
    # per-iteration parameters: exactly zero gradient for frozen slots, nonzero for the last k
    per_iter = {"w_proj": g["w_proj"][...], "post": g["post_norm"]["scale"][...], "iter": g["iter_norm"]["bias"][...]}
    for name, arr in per_iter.items():
        arr = np.asarray(arr)
        assert np.all(arr[: n - k] == 0), name
        assert np.abs(arr[n - k :]).max() > 0, name
    full = trunc(state, jnp.int32(n), jnp.int32(0))
    assert np.abs(np.asarray(full["w_proj"][...])[0]).max() > 0  # k = 0: all iterations train


def _attention_f64(q, k, v, *, segment_ids_BT=None, causal=True, **_):
    """Plain causal attention that keeps the input precision (the registry's xla path computes in fp32)."""
    T, H = q.shape[1], q.shape[-1]
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(jnp.asarray(H, q.dtype))
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)


def test_finite_difference_float64(monkeypatch):
    import asura.model.layers as layers

    monkeypatch.setattr(layers, "attention", _attention_f64)
    cfg = ModelConfig(
        vocab_size=16, d_model=8, n_heads=2, n_layers=1, iterations=2, max_iterations=2, adapter="abba",
        adapter_rank=2, adapter_rank2=2, guidance="linear", z_loss=1e-2, ce_chunk=8, mlp="swiglu", d_ff=16,
        adapter_targets=("q", "gate", "down"), norm="rmsnorm", tie_embeddings=False, dtype="float64",
        param_dtype="float64",
    )  # fmt: skip
    with jax.enable_x64(True):
        graphdef, state = nnx.split(build(cfg, 31))
        state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), state)
        batch = make_batch(32)
        batch = {**batch, "inputs": batch["inputs"] % 16, "targets": batch["targets"] % 16}
        vg = jax.jit(jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=jnp.int32(2))[0]))
        loss, g = vg(state)
        assert loss.dtype == jnp.float64
        rng = np.random.default_rng(0)
        eps = 1e-6
        for _ in range(3):
            d = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), state)
            plus = vg(jax.tree.map(lambda x, y: x + eps * y, state, d))[0]
            minus = vg(jax.tree.map(lambda x, y: x - eps * y, state, d))[0]
            fd = (plus - minus) / (2 * eps)
            analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True))
            np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)


def test_model_init_logical_axes():
    """Every parameter carries one logical axis name per array dimension; per-iteration stacks
    lead with 'iteration' over max_iterations slots."""
    from asura.compat import variable_axes
    from asura.config.schema import LOGICAL_AXES

    model = nnx.eval_shape(lambda: LoopedLM(ALL_ON, rngs=nnx.Rngs(0)))
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    per_iter = ("w_proj", "post_norm", "iter_norm", "u1", "u2", "v1", "v2")
    assert len(flat) > 20 and sum(any(s in path for s in per_iter) for path, _ in flat) >= 10
    for path, var in flat:
        shape, names = var.get_value().shape, variable_axes(var)
        assert names is not None, path
        assert len(names) == len(shape), (path, names, shape)
        assert all(a is None or a in LOGICAL_AXES for a in names), (path, names)
        if any(s in path for s in per_iter):
            assert names[0] == "iteration" and shape[0] == ALL_ON.max_iterations, (path, names, shape)
        else:
            assert "iteration" not in names, (path, names)


# ------------------------------------------------------------- guidance weights
# Hand-computed w_S over S = 5 scan steps for each depth n = 1..5 (M = 3 per-iteration slots).
# Explicit weights (0.2, 0.3, 0.5) are read at slot(t) and renormalised over the n steps run.
S_GUIDE = 5
HAND_WEIGHTS = {
    "none": {n: [1.0 if t == n - 1 else 0.0 for t in range(S_GUIDE)] for n in range(1, 6)},
    "uniform": {
        1: [1, 0, 0, 0, 0],
        2: [1 / 2, 1 / 2, 0, 0, 0],
        3: [1 / 3, 1 / 3, 1 / 3, 0, 0],
        4: [1 / 4, 1 / 4, 1 / 4, 1 / 4, 0],
        5: [1 / 5, 1 / 5, 1 / 5, 1 / 5, 1 / 5],
    },
    "linear": {  # ∝ t + 1
        1: [1, 0, 0, 0, 0],
        2: [1 / 3, 2 / 3, 0, 0, 0],
        3: [1 / 6, 2 / 6, 3 / 6, 0, 0],
        4: [1 / 10, 2 / 10, 3 / 10, 4 / 10, 0],
        5: [1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15],
    },
    "explicit-last": {  # slots 0 1 2 2 2
        1: [1, 0, 0, 0, 0],
        2: [0.2 / 0.5, 0.3 / 0.5, 0, 0, 0],
        3: [0.2, 0.3, 0.5, 0, 0],
        4: [0.2 / 1.5, 0.3 / 1.5, 0.5 / 1.5, 0.5 / 1.5, 0],
        5: [0.2 / 2.0, 0.3 / 2.0, 0.5 / 2.0, 0.5 / 2.0, 0.5 / 2.0],
    },
    "explicit-cycle": {  # slots 0 1 2 0 1
        1: [1, 0, 0, 0, 0],
        2: [0.2 / 0.5, 0.3 / 0.5, 0, 0, 0],
        3: [0.2, 0.3, 0.5, 0, 0],
        4: [0.2 / 1.2, 0.3 / 1.2, 0.5 / 1.2, 0.2 / 1.2, 0],
        5: [0.2 / 1.5, 0.3 / 1.5, 0.5 / 1.5, 0.2 / 1.5, 0.3 / 1.5],
    },
}
# One fp32 division per weight after an fp32 sum of <= 5 terms: a few ulps (2^-24 each).
W_TOL = dict(rtol=1e-6, atol=1e-7)


def _guided(mode: str, weights=(0.2, 0.3, 0.5)) -> ModelConfig:
    guidance, _, extrapolation = mode.partition("-")
    return dataclasses.replace(
        ALL_ON,
        guidance=guidance,
        guidance_weights=weights if guidance == "explicit" else (),
        extrapolation=extrapolation or "last",
    )


@pytest.mark.parametrize("mode", list(HAND_WEIGHTS))
def test_guidance_weights_match_hand_values(mode):
    cfg = _guided(mode)
    model = nnx.eval_shape(lambda: LoopedLM(cfg, rngs=nnx.Rngs(0)))
    traced = jax.jit(lambda n: guidance_weights(cfg, n, S_GUIDE, model.slot))
    for n, want in HAND_WEIGHTS[mode].items():
        got = guidance_weights(cfg, n, S_GUIDE, model.slot)
        np.testing.assert_allclose(got, want, **W_TOL, err_msg=f"{mode} n={n}")
        np.testing.assert_allclose(traced(jnp.int32(n)), want, **W_TOL, err_msg=f"{mode} traced n={n}")
    assert traced._cache_size() == 1  # one program serves every depth


def test_guidance_weights_explicit_defaults_and_zero_mass():
    """Without slot_fn, steps past the weights reuse the last one; a depth whose weights are all
    zero scores its final iteration only; partial zeros renormalise over the rest."""
    cfg = _guided("explicit")
    for n, want in HAND_WEIGHTS["explicit-last"].items():
        np.testing.assert_allclose(guidance_weights(cfg, n, S_GUIDE), want, **W_TOL, err_msg=f"n={n}")
    zero = _guided("explicit", (0.0, 0.0, 1.0))
    half = _guided("explicit", (0.0, 0.5, 0.5))
    cases = [
        (zero, 1, [1, 0, 0]),  # no mass on the first step: the final iteration (t = 0)
        (zero, 2, [0, 1, 0]),
        (zero, 3, [0, 0, 1]),
        (half, 1, [1, 0, 0]),
        (half, 2, [0, 1, 0]),  # 0.5 / 0.5
        (half, 3, [0, 0.5, 0.5]),
    ]
    traced = {c: jax.jit(lambda n, c=c: guidance_weights(c, n, 3)) for c in (zero, half)}
    for c, n, want in cases:
        np.testing.assert_allclose(guidance_weights(c, n, 3), want, **W_TOL, err_msg=f"{c.guidance_weights} n={n}")
        np.testing.assert_allclose(traced[c](jnp.int32(n)), want, **W_TOL, err_msg=f"{c.guidance_weights} n={n}")


def test_loss_weights_each_iteration_by_its_slot():
    """model.loss sums w_t · ce_t with the extrapolated slot's weight (cycle: slots 0 1 2 0 1)."""
    cfg = dataclasses.replace(_guided("explicit-cycle"), adapter="none", qk_norm=False)
    graphdef, state = nnx.split(build(cfg, 41))
    batch = make_batch(42)

    @jax.jit
    def run(state, n):
        return nnx.merge(graphdef, state).loss(batch, n=n, max_depth=S_GUIDE)

    for n, w in HAND_WEIGHTS["explicit-cycle"].items():
        objective, aux = run(state, jnp.int32(n))
        ce_S = np.asarray(aux["ce_per_iter"], np.float64)
        assert np.isnan(ce_S[n:]).all() and np.isfinite(ce_S[:n]).all(), (n, ce_S)
        guided_ce = float(objective - aux["z_loss"])  # Σ_t w_t · ce_t
        # fp32: <= 5 weighted terms of O(1) CEs, summed in another order: a few ulps.
        np.testing.assert_allclose(guided_ce, np.dot(w[:n], ce_S[:n]), rtol=1e-6, err_msg=f"n={n}")
