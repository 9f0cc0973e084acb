"""The learned exit gate (model.exit_gate, Ouro): its loss against a plain reference computed from
the fixed-depth latents, its gradients through the while driver against the unrolled loop, the
`gate` exit rule against the cumulative exit probability, and the refusals."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from asura.config import ConfigError
from asura.config.schema import Config, ModelConfig
from asura.config.validate import validate
from asura.infer.cache import CachedModel
from asura.model.halting import HaltSpec

V, B, T, N = 40, 2, 9, 4
GATED = ModelConfig(
    vocab_size=V, d_model=32, n_heads=2, n_layers=1, iterations=N, max_iterations=N, injection="add",
    loop_start="zero", iter_norm=False, post_norm=False, guidance="none", qk_norm=False, attention="xla",
    exit_gate=True, exit_entropy=0.1, z_loss=1e-2,
)  # fmt: skip
RNG = np.random.default_rng(5)
BATCH = {
    "inputs": jnp.asarray(RNG.integers(0, V, (B, T)), jnp.int32),
    "targets": jnp.asarray(RNG.integers(0, V, (B, T)), jnp.int32),
    "loss_mask": jnp.asarray(RNG.random((B, T)) > 0.3, jnp.float32),
}
# fp32 against fp32 in another op order (while driver vs a numpy reference from the latents):
# u = 6e-8 per op, ~10^2 ops per iteration, <= 4 iterations, O(1) losses.
TOL = dict(rtol=2e-5, atol=2e-5)


def per_iteration(model, n, h_SBTD=None):
    """float64, one [B, T] array per iteration t < n: (ce_t, lse_t, gate logit_t) read from the
    latents h_t (default: the fixed-depth model's), by hand: FinalNorm, the head, the gate."""
    if h_SBTD is None:
        h_SBTD = model.latents(BATCH["inputs"], n)[:n]
    h_SBTD = np.asarray(h_SBTD, np.float64)
    w_DV = np.asarray(model.w_DV(), np.float64)
    tgt = np.asarray(BATCH["targets"])
    out = []
    for t in range(n):
        x = np.asarray(model.final_norm(jnp.asarray(h_SBTD[t], jnp.float32)), np.float64)
        logits = x @ w_DV
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        ce = lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        out.append((ce, lse, x @ np.asarray(model.w_gate[...], np.float64) + float(model.b_gate[...][0])))
    return out


def masked(a):
    """The masked token mean of the losses."""
    mask = np.asarray(BATCH["loss_mask"], np.float64)
    return (a * mask).sum() / mask.sum()


def reference(model, n, h_SBTD=None):
    """Ouro's objective by hand: λ_t from the gate on FinalNorm(h_t), p_t = λ_t·S_{t−1} (S_{n−1} at
    t = n), Σ_t mean_mask(p_t·(ce_t + z·lse_t²)) − β·Σ_t mean_mask(−p_t log p_t). h_SBTD: the n
    latents it is computed on (default: the fixed-depth model's)."""
    cfg = model.cfg
    survival, objective, entropy, depth = np.ones((B, T)), 0.0, 0.0, 0.0
    for t, (ce, lse, logit) in enumerate(per_iteration(model, n, h_SBTD)):
        lam = 1 / (1 + np.exp(-logit))
        p = survival if t == n - 1 else lam * survival
        survival = survival * (1 - lam)
        objective += masked(p * (ce + cfg.z_loss * lse**2))
        entropy += masked(-p * np.log(p))
        depth += masked(p * (t + 1))
    return objective - cfg.exit_entropy * entropy, entropy, depth


@pytest.mark.parametrize("loop", ["while", "scan"])
def test_gate_loss_matches_the_reference_at_every_depth(loop):
    model = random_model(dataclasses.replace(GATED, loop=loop), 0, 0.5)
    graphdef, state = nnx.split(model)
    loss = jax.jit(lambda st, n: nnx.merge(graphdef, st).loss(BATCH, n=n, max_depth=N))
    for n in range(1, N + 1):
        objective, aux = loss(state, jnp.int32(n))
        want, entropy, depth = reference(model, n)
        np.testing.assert_allclose(objective, want, **TOL)
        np.testing.assert_allclose(aux["exit_entropy"], entropy, **TOL)
        np.testing.assert_allclose(aux["exit_depth"], depth, **TOL)
        assert 1 <= float(aux["exit_depth"]) <= n
    assert loss._cache_size() == 1


def while_grads_equal_unrolled(cfg: ModelConfig, seed: int, n: int = 3):
    """The loss's gradients through the while driver, checked against the unrolled loop's."""
    graphdef, state = nnx.split(random_model(dataclasses.replace(cfg, remat="iteration"), seed, 0.5))

    def grad(unroll):
        return jax.grad(lambda st: nnx.merge(graphdef, st).loss(BATCH, n=n, unroll=unroll)[0])(state)

    got, want = grad(False), grad(True)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, **TOL)
    return got


def test_gate_loss_gradients_while_equal_unrolled_and_reach_the_gate():
    got = while_grads_equal_unrolled(GATED, 1)
    assert float(jnp.abs(got["w_gate"][...]).max()) > 0 and float(jnp.abs(got["b_gate"][...]).max()) > 0


@pytest.mark.parametrize("k", [1, 2])
def test_gate_loss_under_halting_is_the_gate_loss_of_each_tokens_exit_latent(k):
    # depth.halt_gate_loss: every token exits after k of N under "steps"; from then on its latent is its
    # exit latent, so the objective is the reference's over h_1..h_k, then h_k repeated to N
    model = random_model(GATED, 3, 0.5)
    objective, aux = model.loss(BATCH, n=N, halt=HaltSpec("steps", float(k)), gate_loss=True)
    lat = np.asarray(model.latents(BATCH["inputs"], k))[:k]
    want, entropy, depth = reference(model, N, np.concatenate([lat, np.repeat(lat[-1:], N - k, 0)]))
    np.testing.assert_allclose(objective, want, **TOL)
    np.testing.assert_allclose(aux["exit_entropy"], entropy, **TOL)
    np.testing.assert_allclose(aux["exit_depth"], depth, **TOL)
    assert np.all(np.asarray(aux["depth_BT"]) == k)
    # ce is each token's CE at its exit, as under halting without the gate's loss
    np.testing.assert_allclose(aux["ce"], model.loss(BATCH, n=N, halt=HaltSpec("steps", float(k)))[1]["ce"], **TOL)


def test_gate_loss_under_a_rule_that_never_exits_is_the_gate_loss_and_trains_the_gate():
    model = random_model(dataclasses.replace(GATED, remat="iteration"), 4, 0.5)
    graphdef, state = nnx.split(model)

    def value_grad(**kw):
        return jax.value_and_grad(lambda st: nnx.merge(graphdef, st).loss(BATCH, n=3, **kw)[0])(state)

    (got, g_got), (want, g_want) = value_grad(halt=HaltSpec("never"), gate_loss=True), value_grad()
    assert float(got) == float(want)  # the same forward ops: "never" runs every iteration for every token
    # the backward also runs through the halting selects and copied keys/values (all taking the new
    # values here), which reorders fp32 sums: TOL, not bit equality
    for g, w in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(g, w, **TOL)
    # under the gate's own exits the gate gets a gradient with the gate's loss, none without it
    spec = HaltSpec("gate", 0.5)
    _, with_loss = value_grad(halt=spec, gate_loss=True)
    _, without = value_grad(halt=spec)
    assert float(jnp.abs(with_loss["w_gate"][...]).max()) > 0 and float(jnp.abs(with_loss["b_gate"][...]).max()) > 0
    assert float(jnp.abs(without["w_gate"][...]).max()) == 0
    # and the while driver (all N steps under the gate's loss) equals the unrolled loop, gradients too
    (u, g_u), (w_, g_w) = (
        jax.value_and_grad(lambda st, un=un: nnx.merge(graphdef, st).loss(BATCH, n=3, halt=spec, gate_loss=True,
                                                                          unroll=un)[0])(state)
        for un in (True, False)
    )  # fmt: skip
    np.testing.assert_allclose(w_, u, **TOL)
    for g, w in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(g, w, **TOL)


def test_gate_rule_exits_where_the_cumulative_exit_probability_passes_the_threshold():
    model = random_model(GATED, 2, 0.5)
    h_SBTD = model.latents(BATCH["inputs"], N)
    lam_SBT = np.stack([np.asarray(model.exit_prob(h_SBTD[t])) for t in range(N)])
    cdf_SBT = 1 - np.cumprod(1 - lam_SBT, axis=0)
    for q in (0.3, 0.6, 0.9):
        want = np.where((cdf_SBT >= q).any(0), (cdf_SBT >= q).argmax(0) + 1, N)
        if np.abs(cdf_SBT - q).min() < 1e-4:  # a value at the threshold: rounding decides (not a test)
            continue
        res = model.run_loop(BATCH["inputs"], N, halt=HaltSpec("gate", q, kv="full"))
        np.testing.assert_array_equal(np.asarray(res.depth_BT), want)
    # kv=copy in the KV-cached decoder equals the forward under the same rule
    spec = HaltSpec("gate", 0.6)
    res = model.run_loop(BATCH["inputs"], N, halt=spec)
    cm = CachedModel(model, halt=spec)
    st = cm.prefill(cm.init(B, T), BATCH["inputs"][:, :1], N)
    logits, depth = [st.logits_BCV], [st.depth_BC]
    for i in range(1, T):
        st = cm.extend(st.cache, BATCH["inputs"][:, i : i + 1], N)
        logits.append(st.logits_BCV)
        depth.append(st.depth_BC)
    np.testing.assert_array_equal(np.concatenate(depth, 1), np.asarray(res.depth_BT))
    np.testing.assert_allclose(np.concatenate(logits, 1), np.asarray(model.head(res.h_BTD)), **TOL)


def test_refusals():
    plain = random_model(dataclasses.replace(GATED, exit_gate=False, exit_entropy=0.0), 0, 0.5)
    with pytest.raises(ValueError, match=r"reads the learned exit gate: train with model\.exit_gate=true"):
        plain.run_loop(BATCH["inputs"], N, halt=HaltSpec("gate", 0.5))
    with pytest.raises(ConfigError, match="would weight them twice: set guidance=none"):
        validate(Config(model=dataclasses.replace(GATED, guidance="linear")))
    with pytest.raises(ConfigError, match=r"exit_entropy is set but model\.exit_gate=false"):
        validate(Config(model=dataclasses.replace(GATED, exit_gate=False)))
    with pytest.raises(ConfigError, match=r"model\.exit_entropy must be >= 0"):
        validate(Config(model=dataclasses.replace(GATED, exit_entropy=-1.0)))


# ------------------------------------------------------------------ Ouro's stage II (exit_gate_loss=improvement)
STAGE2 = dataclasses.replace(GATED, exit_entropy=0.0, exit_gate_loss="improvement", exit_gate_k=50.0,
                             exit_gate_gamma=0.05)  # fmt: skip


def reference_improvement(model, n):
    """Ouro's stage-II loss by hand from the fixed-depth latents: decision t (λ_t, exit after t + 1
    iterations) is labelled c_t = σ(k·(max(0, ce_t − ce_{t+1}) − γ)) ("continuing helped"), and the
    loss is Σ_{t<n−1} mean_mask(−c_t·log(1 − λ_t) − (1 − c_t)·log λ_t) / (n − 1); 0 at n = 1."""
    cfg = model.cfg
    steps = per_iteration(model, n)
    total = 0.0
    for (ce, _, logit), (ce_next, _, _) in itertools.pairwise(steps):
        c = 1 / (1 + np.exp(-cfg.exit_gate_k * (np.maximum(ce - ce_next, 0) - cfg.exit_gate_gamma)))
        lam = 1 / (1 + np.exp(-logit))
        total += masked(-c * np.log(1 - lam) - (1 - c) * np.log(lam))
    return total / max(n - 1, 1)


@pytest.mark.parametrize("loop", ["while", "scan"])
def test_improvement_loss_matches_the_reference_at_every_depth(loop):
    # w_gate at scale 0.5 and a depth-4 model at init: the CE changes by O(0.1) nats per iteration, so
    # the labels straddle γ = 0.05 and neither term of the cross-entropy is idle
    model = random_model(dataclasses.replace(STAGE2, loop=loop), 6, 0.5)
    graphdef, state = nnx.split(model)
    loss = jax.jit(lambda st, n: nnx.merge(graphdef, st).loss(BATCH, n=n, max_depth=N))
    for n in range(1, N + 1):
        objective, aux = loss(state, jnp.int32(n))
        np.testing.assert_allclose(objective, reference_improvement(model, n), **TOL)
        # the metrics keep their meaning: the final iteration's CE and the gate's expected depth
        _, entropy, depth = reference(model, n)
        np.testing.assert_allclose(aux["exit_depth"], depth, **TOL)
        np.testing.assert_allclose(aux["exit_entropy"], entropy, **TOL)
        np.testing.assert_allclose(aux["ce"], model.loss(BATCH, n=n)[1]["ce"], **TOL)
    assert float(loss(state, jnp.int32(1))[0]) == 0.0  # one iteration: nothing to decide


def test_improvement_loss_trains_the_gate_alone_and_while_equals_unrolled():
    flat = nnx.to_flat_state(while_grads_equal_unrolled(STAGE2, 7))
    gate = {path: v for path, v in flat if path[0] in ("w_gate", "b_gate")}
    rest = [v for path, v in flat if path[0] not in ("w_gate", "b_gate")]
    assert all(float(jnp.abs(v[...]).max()) > 0 for v in gate.values())
    assert all(float(jnp.abs(v[...]).max()) == 0 for v in rest)  # no gradient reaches the body


@pytest.mark.parametrize(
    "model, train, message",
    [
        (dict(exit_gate_k=10.0, exit_gate_loss="expected", exit_gate_gamma=0.005), {},
         "model.exit_gate_k=10.0 is set but model.exit_gate_loss=expected ignores it"),
        ({}, {}, "model.exit_gate_loss=improvement trains the gate alone (Ouro's stage II): set train.trainable"),
        (dict(exit_entropy=0.1), dict(trainable="exit_gate"), "model.exit_gate_loss=improvement has none"),
        (dict(exit_gate=False), dict(trainable="exit_gate"), "it needs model.exit_gate=true"),
        (dict(iterations=1), dict(trainable="exit_gate"), "needs model.iterations >= 2"),
        (dict(exit_gate_gamma=-1.0), dict(trainable="exit_gate"), "model.exit_gate_gamma must be >= 0"),
        (dict(exit_gate_loss="other"), {}, "model.exit_gate_loss='other' is not valid; choose one of expected"),
        (dict(exit_gate_loss="expected"), dict(trainable="some"), "train.trainable='some' is not valid"),
    ],
)  # fmt: skip
def test_stage_two_refusals(model, train, message):
    from asura.config.schema import TrainConfig

    cfg = Config(model=dataclasses.replace(STAGE2, **model), train=dataclasses.replace(TrainConfig(), **train))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
