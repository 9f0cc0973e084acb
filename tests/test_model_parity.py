"""LoopedLM forward parity: vanilla vs an independent plain-JAX transformer,
traced-n scan vs the Python-unrolled loop, per-iteration indexing, one
compilation for every depth, and extrapolation past max_iterations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from asura.config.schema import ModelConfig

V, T, B = 32, 12, 2
# fp32 against fp32 computed in another order (scan vs unrolled, fused vs plain einsums): rounding
# u = 2^-24 per op, ~10^2 ops in series over three iterations, on O(1) logits: ~1e-5 at worst.
TOL = dict(rtol=2e-5, atol=2e-5)

VANILLA = ModelConfig(
    vocab_size=V, d_model=32, n_heads=2, n_layers=2, iterations=1, max_iterations=1,
    injection="none", iter_norm=False, post_norm=False, adapter="none", guidance="none",
    qk_norm=False, z_loss=0.0,
)  # fmt: skip
ALL_ON = ModelConfig(
    vocab_size=V, d_model=32, n_heads=2, n_layers=1, iterations=3, max_iterations=3,
    injection="projconcat", iter_norm=True, post_norm=True, adapter="abba", adapter_rank=2, adapter_rank2=3,
    adapter_targets=("q", "v", "o", "down"), guidance="linear", qk_norm=True, z_loss=1e-2, ce_chunk=8,
)  # fmt: skip


def make_batch(seed, packed=False):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tok = jax.random.randint(k1, (B, T), 0, V)
    batch = {
        "inputs": tok,
        "targets": jax.random.randint(k2, (B, T), 0, V),
        "loss_mask": (jax.random.uniform(k2, (B, T)) > 0.3).astype(jnp.float32),
    }
    if packed:
        batch["segment_ids"] = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 3 + [2] * 6 + [3] * 3], jnp.int32)
    return batch


def build(cfg, seed, scale=1.0):
    """conftest.random_model: every parameter random, so indexing bugs cannot hide behind ΔW = 0."""
    return random_model(cfg, seed, scale)


# ----------------------------------------------------------- independent reference
def ref_forward(p, cfg, tok, seg, inject_n=0):
    """Plain pre-LN GPT: layernorm, tanh-GeLU MLP, rotate-half RoPE, tied head.

    inject_n > 0: Fan et al.'s looped model instead, the blocks applied inject_n times to h + e
    (additive input injection) from h_0 = 0 (cfg.loop_start=zero) or h_0 = e (embed)."""

    def ln(x, w):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + cfg.norm_eps) * w["scale"] + w["bias"]

    # per-document positions, by hand
    pos = np.zeros((B, T), np.int32)
    seg_np = np.asarray(seg)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if seg_np[b, t] == seg_np[b, t - 1] else 0
    H = cfg.d_head
    inv = 1.0 / cfg.rope_theta ** (np.arange(H // 2) / (H // 2))
    ang = pos[..., None] * inv  # B T H/2
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rot(x):  # B T N H
        if cfg.position == "none":  # NoPE: no rotation; the causal mask alone orders tokens
            return x
        a, b = x[..., : H // 2], x[..., H // 2 :]
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    mask = (np.arange(T)[:, None] >= np.arange(T)[None]) & (seg_np[:, :, None] == seg_np[:, None, :])

    def stack(x):
        for blk in p["blocks"].values():
            x = layer(x, blk)
        return x

    def layer(x, blk):
        a = blk["attn"]
        y = ln(x, blk["ln1"])
        q = rot((y @ a["q"]["kernel"]).reshape(B, T, cfg.n_heads, H))
        k = rot((y @ a["k"]["kernel"]).reshape(B, T, cfg.n_heads, H))
        v = (y @ a["v"]["kernel"]).reshape(B, T, cfg.n_heads, H)
        s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(H)
        s = jnp.where(mask[:, None], s, -jnp.inf)
        o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v).reshape(B, T, -1)
        x = x + o @ a["o"]["kernel"]
        m = blk["mlp"]
        return x + jax.nn.gelu(ln(x, blk["ln2"]) @ m["up"]["kernel"], approximate=True) @ m["down"]["kernel"]

    e = p["embed"][tok]
    if inject_n:
        h = jnp.zeros_like(e) if cfg.loop_start == "zero" else e
        for _ in range(inject_n):
            h = stack(h + e)
    else:
        h = stack(e)
    return ln(h, p["final_norm"]) @ p["embed"].T


@pytest.mark.parametrize("position", ["rope", "none"])
def test_vanilla_matches_plain_transformer(position):
    cfg = dataclasses.replace(VANILLA, position=position)
    model = build(cfg, 1, scale=0.3)
    batch = make_batch(2, packed=True)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref = jax.jit(lambda p, tok: ref_forward(p, cfg, tok, batch["segment_ids"]))(p, batch["inputs"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        return m(batch["inputs"], n=1, segment_ids_BT=batch["segment_ids"]), m.loss(batch, n=1)

    got, (loss, aux) = run(state, batch)
    np.testing.assert_allclose(got, ref, **TOL)
    ce = jax.nn.logsumexp(ref, -1) - jnp.take_along_axis(ref, batch["targets"][..., None], -1)[..., 0]
    want = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(loss, want, **TOL)
    np.testing.assert_allclose(aux["ce"], want, **TOL)
    acc = ((ref.argmax(-1) == batch["targets"]) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(aux["accuracy"], acc, **TOL)


@pytest.mark.parametrize(("n_layers", "n"), [(1, 3), (2, 3), (2, 2)])
def test_looped_with_every_trick_off_is_a_tied_weight_vanilla_stack(n_layers, n):
    """Saunshi et al.'s (k ⊗ L): a k-layer block looped L times is a kL-layer vanilla model whose
    consecutive k-layer groups share weights. With every trick off, asura's looped model must be
    exactly that: the plain reference run over the block's layers repeated n times (also at a depth
    below max_iterations, through the same traced-depth program)."""
    cfg = dataclasses.replace(VANILLA, n_layers=n_layers, iterations=3, max_iterations=3)
    model = build(cfg, 7, scale=0.3)
    batch = make_batch(8, packed=True)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(p) == {"blocks", "embed", "final_norm"}, "every trick off leaves no per-iteration parameter"
    blocks = list(p["blocks"].values())
    tied = {**p, "blocks": dict(enumerate(blocks * n))}
    ref = jax.jit(lambda q, tok: ref_forward(q, cfg, tok, batch["segment_ids"]))(tied, batch["inputs"])
    graphdef, state = nnx.split(model)
    got = jax.jit(lambda st, tok, n: nnx.merge(graphdef, st)(tok, n=n, segment_ids_BT=batch["segment_ids"]))(
        state, batch["inputs"], jnp.int32(n)
    )
    np.testing.assert_allclose(got, ref, **TOL)  # TOL: fp32, another op order, <= 6 layers deep


@pytest.mark.parametrize("loop_start", ["embed", "zero"])
def test_additive_injection_matches_reference_from_either_start(loop_start):
    """Input injection as Fan et al. 2024 (h_t = blocks(h_{t-1} + e)), every other trick off, NoPE:
    from h_0 = 0 (loop_start=zero, theirs) or h_0 = e (embed, asura's default), at every depth of
    one traced-depth program. With zero, depth 1 is the vanilla model on e."""
    cfg = dataclasses.replace(
        VANILLA, iterations=3, max_iterations=3, injection="add", position="none", loop_start=loop_start
    )
    model = build(cfg, 11, scale=0.3)
    batch = make_batch(12, packed=True)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, tok, n: nnx.merge(graphdef, st)(tok, n=n, segment_ids_BT=batch["segment_ids"]))
    for n in range(1, 4):
        ref = ref_forward(p, cfg, batch["inputs"], batch["segment_ids"], inject_n=n)
        np.testing.assert_allclose(fwd(state, batch["inputs"], jnp.int32(n)), ref, **TOL)  # fp32, <= 6 layers
    if loop_start == "zero":
        vanilla = ref_forward(p, dataclasses.replace(cfg, injection="none"), batch["inputs"], batch["segment_ids"])
        np.testing.assert_allclose(fwd(state, batch["inputs"], jnp.int32(1)), vanilla, **TOL)


def test_zero_start_needs_injection():
    from asura.config import ConfigError
    from asura.config.schema import Config
    from asura.config.validate import validate

    with pytest.raises(ConfigError, match=r"loop_start=zero needs model.injection=add\|projconcat"):
        validate(Config(model=dataclasses.replace(VANILLA, loop_start="zero")))


# ------------------------------------------------------------- traced depth
@pytest.fixture(scope="module")
def looped():
    """ALL_ON model, random params, and a jitted (state, batch, n) -> outputs with a trace counter."""
    model = build(ALL_ON, 4)
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def run(state, batch, n):
        traces.append(1)  # python side effect: runs once per trace
        m = nnx.merge(graphdef, state)
        loss, aux = m.loss(batch, n=n)
        return m(batch["inputs"], n=n), loss, aux

    return model, graphdef, state, run, traces


def test_traced_depth_matches_unrolled_every_n(looped):
    model, _, state, run, traces = looped
    batch = make_batch(5)
    for n in range(1, ALL_ON.max_iterations + 1):
        logits, loss, aux = run(state, batch, jnp.int32(n))
        ref_logits = model(batch["inputs"], n=n, unroll=True)
        ref_loss, ref_aux = model.loss(batch, n=n, unroll=True)
        np.testing.assert_allclose(logits, ref_logits, **TOL)
        np.testing.assert_allclose(loss, ref_loss, **TOL)
        np.testing.assert_allclose(aux["ce_per_iter"], ref_aux["ce_per_iter"], **TOL)  # NaNs must match too
        assert np.all(np.isnan(np.asarray(aux["ce_per_iter"])[n:]))  # steps that did not run
        assert np.all(np.asarray(aux["ce_per_iter"])[:n] > 0)
    # one compiled program served every depth
    assert len(traces) == 1
    assert run._cache_size() == 1


def test_per_iteration_indexing(looped):
    """Perturbing slot j of every per-iteration parameter changes the output iff n > j (0-based j)."""
    _, _, state, run, _ = looped
    batch = make_batch(6)
    M = ALL_ON.max_iterations
    base = [run(state, batch, jnp.int32(n))[0] for n in range(1, M + 1)]
    for j in range(M):
        key = jax.random.key(100 + j)

        def bump(path, x, j=j, key=key):
            names = [str(getattr(k, "key", k)) for k in path]
            per_iter = names[0] in ("w_proj", "post_norm", "iter_norm") or names[-1] in ("u1", "u2", "v1", "v2")
            if not per_iter:
                return x
            return x.at[j].add(0.5 * jax.random.normal(key, x.shape[1:]))

        pert = jax.tree_util.tree_map_with_path(bump, state)
        for n in range(1, M + 1):
            out = run(pert, batch, jnp.int32(n))[0]
            changed = not np.allclose(out, base[n - 1], rtol=0, atol=1e-6)
            assert changed == (n > j), (j, n)


def test_extrapolation_none_raises():
    cfg = dataclasses.replace(ALL_ON, guidance="none", adapter="none")
    model = build(cfg, 0)
    tok = make_batch(0)["inputs"]
    with pytest.raises(ValueError, match=r"max_iterations=3.*extrapolation.*last.*cycle"):
        model(tok, n=4)
    with pytest.raises(ValueError, match="max_iterations=3"):
        model(tok, n=jnp.int32(2), max_depth=5)


@pytest.mark.parametrize("mode", ["last", "cycle"])
def test_extrapolation_indexing(mode):
    cfg = dataclasses.replace(ALL_ON, guidance="none", adapter="none", extrapolation=mode)
    model = build(cfg, 7)
    tok = make_batch(8)["inputs"]
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, n: nnx.merge(graphdef, s)(tok, n=n, max_depth=5))
    e = model.embed[...][tok]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    slots = [0, 1, 2, 2, 2] if mode == "last" else [0, 1, 2, 0, 1]
    h = e
    for n in range(1, 6):
        h = model.iteration(h, e, slots[n - 1], pos, None)
        np.testing.assert_allclose(fwd(state, jnp.int32(n)), model.head(h), **TOL)
    # a python-int n past max also works without max_depth
    np.testing.assert_allclose(model(tok, n=5), model.head(h), **TOL)


# bf16 keeps 8 significand bits: one rounding is off by at most u = 2^-8 (relative). Between the
# embedding and the logits, one ALL_ON iteration rounds to bf16 about 23 times in series (W_proj,
# ln1, q/v + adapter, qk-norm, RoPE, attention out, o + adapter, residual, ln2, up, gelu,
# down + adapter, residual, post-norm, iter-norm) and the head twice more (final norm, W_DV cast;
# it accumulates in fp32). The per-iteration norms stop errors compounding across iterations, and
# independent roundings add in quadrature (probabilistic rounding analysis, Higham & Mary 2019),
# so the logits are off by ~sqrt(k)·u of their scale, k = 23·n + 2.
BF16_U = 2.0**-8
BF16_ROUNDINGS_PER_ITER, BF16_HEAD_ROUNDINGS = 23, 2


def test_bfloat16_compute_fp32_params_and_logits():
    cfg = dataclasses.replace(ALL_ON, dtype="bfloat16", remat="block")
    model = build(cfg, 9)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split(model)
    batch = make_batch(10)

    @jax.jit
    def run(state, n):
        m = nnx.merge(graphdef, state)
        return m(batch["inputs"], n=n), m.loss(batch, n=n)[0]

    ref_model = build(ALL_ON, 9)
    for n in range(1, ALL_ON.max_iterations + 1):
        logits, loss = run(state, jnp.int32(n))
        ref_logits = ref_model(batch["inputs"], n=n)
        assert logits.dtype == jnp.float32 and np.isfinite(float(loss))
        err = float(jnp.abs(logits - ref_logits).max() / jnp.abs(ref_logits).max())
        bound = np.sqrt(BF16_ROUNDINGS_PER_ITER * n + BF16_HEAD_ROUNDINGS) * BF16_U
        assert err < bound, (n, err / BF16_U, bound / BF16_U)
        # ...and bf16 really ran: fp32 in another order differs by ~2^-20, bf16 by ~u.
        assert err > BF16_U / 16, (n, err)


@pytest.mark.parametrize("cfg", [VANILLA, ALL_ON], ids=["guidance-none", "guidance-linear"])
def test_loss_with_pred_matches_argmax_of_logits(cfg):
    """Evaluation's one-pass predictions equal argmax of a separate forward, at every depth (incl. n < S)."""
    model = build(cfg, 6)
    batch = make_batch(8, packed=True)
    for n in range(1, cfg.max_iterations + 1):
        loss, aux = model.loss(batch, n=n, with_pred=True)
        loss_plain, _ = model.loss(batch, n=n)
        logits = model(batch["inputs"], n=n, segment_ids_BT=batch["segment_ids"])
        np.testing.assert_array_equal(aux["pred"], np.argmax(np.asarray(logits), axis=-1))
        assert float(loss) == float(loss_plain)
