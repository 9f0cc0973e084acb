"""Flash-attention kernels (GPU/Triton-style and TPU/Mosaic-style) vs the fp32 reference, on CPU in interpret mode.

Values and dq/dk/dv over a grid of shapes: T not a multiple of the block and T=1, 1-8 heads and GQA/MQA,
head dims 32/48/64/128, causal on/off, segment ids on/off, fp32 and bf16. Error metric per METHOD.md:
||out - ref|| / ||ref||, fresh random inputs per case. The denominator is floored at 0.1 RMS (unit-normal
inputs give O(1) values) so an exactly-zero reference, e.g. dq at T=1 where ds = dp - delta cancels, must
match to ~tol/10 absolute.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asura.kernels import common as C
from asura.kernels import flash_gpu, flash_tpu, reference
from asura.kernels.common import MASK_VALUE

# Ids "triton"/"mosaic", not "gpu"/"tpu": conftest turns those keywords into hardware skips.
KERNELS = {"triton": flash_gpu.flash_attention, "mosaic": flash_tpu.flash_attention}
# Observed on CPU: fp32 ~3e-7, bf16 ~3e-3 (bf16 operands into the p@v / ds@k matmuls).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(x).all(), "non-finite values (unwritten or poisoned output?)"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-1 * np.sqrt(ref.size)))


def make_inputs(seed, B, T, N, K, H, dtype, *, seg: bool, S: int | None = None):
    S = T if S is None else S
    kq, kk, kv, ks, kd = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    # Unsorted ids in {0,1,2}: interleaved segments, id 0 is just another segment.
    seg_BT = jax.random.randint(ks, (B, T), 0, 3, jnp.int32) if seg else None
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32)
    return q, k, v, seg_BT, do


@functools.partial(jax.jit, static_argnums=(0, 6))
def _out_and_grads(fn, q, k, v, seg, do, causal):
    o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids_BT=seg, causal=causal), q, k, v)
    return o, vjp(do.astype(o.dtype))


# (B, T, N, K, H, causal, seg, dtype, block_q, block_k, S)
CASES = [
    pytest.param(2, 37, 4, 2, 32, True, True, jnp.float32, 16, 16, None, id="gqa-seg-Tpad-f32"),
    pytest.param(1, 1, 2, 1, 64, True, False, jnp.float32, 16, 16, None, id="T1-causal-f32"),
    pytest.param(1, 1, 1, 1, 32, False, True, jnp.bfloat16, 16, 16, None, id="T1-seg-bf16"),
    pytest.param(1, 50, 3, 3, 32, False, False, jnp.float32, 16, 16, None, id="mha3-noncausal-f32"),
    pytest.param(1, 20, 4, 2, 128, True, True, jnp.bfloat16, 16, 16, None, id="h128-gqa-seg-bf16"),
    pytest.param(1, 33, 8, 2, 32, False, True, jnp.bfloat16, 16, 16, None, id="8heads-noncausal-seg-bf16"),
    pytest.param(1, 40, 2, 2, 64, True, False, jnp.bfloat16, 32, 16, None, id="bq>bk-bf16"),
    pytest.param(1, 48, 2, 1, 32, True, True, jnp.float32, 16, 32, None, id="bq<bk-pad-f32"),
    pytest.param(1, 20, 2, 1, 48, True, False, jnp.float32, 16, 16, None, id="h48-f32"),
    pytest.param(1, 40, 2, 1, 32, True, False, jnp.float32, 16, 16, 24, id="cross-S24-causal-f32"),
]
# Heavier extras, run with -m slow.
CASES += [
    pytest.param(*p, marks=pytest.mark.slow, id=i)
    for p, i in [
        ((2, 40, 4, 1, 64, True, True, jnp.bfloat16, 16, 16, None), "mqa-seg-bf16"),
        ((1, 24, 1, 1, 128, True, False, jnp.float32, 16, 16, None), "h128-1head-f32"),
        ((2, 64, 8, 8, 64, True, True, jnp.float32, 16, 32, None), "8heads-T64-f32"),
    ]
]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(("B", "T", "N", "K", "H", "causal", "seg", "dtype", "bq", "bk", "S"), CASES)
def test_values_and_grads_match_reference(kernel, B, T, N, K, H, causal, seg, dtype, bq, bk, S):
    seed = hash((kernel, B, T, N, K, H, causal, seg, bq, bk, S)) % 2**31
    q, k, v, seg_BT, do = make_inputs(seed, B, T, N, K, H, dtype, seg=seg, S=S)
    fn = functools.partial(KERNELS[kernel], block_q=bq, block_k=bk, interpret=True)
    o, grads = _out_and_grads(fn, q, k, v, seg_BT, do, causal)
    # Reference in fp32 on the same (possibly bf16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, grads_ref = _out_and_grads(reference.attention, *f32, seg_BT, do, causal)
    assert o.dtype == dtype and o.shape == q.shape
    assert [g.dtype for g in grads] == [dtype] * 3
    tol = TOL[dtype]
    assert rel_err(o, o_ref) < tol
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(g, g_ref) < tol, name


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_logsumexp_residual(kernel):
    B, T, N, K, H = 1, 37, 2, 1, 32
    q, k, v, seg_BT, _ = make_inputs(7, B, T, N, K, H, jnp.float32, seg=True)
    mod = flash_gpu if kernel == "triton" else flash_tpu
    tiles = C.Tiles(16, 16, (4, 2) if kernel == "triton" else ())
    cfg = C.FlashConfig(causal=True, T=T, S=T, H=H, fwd=tiles, bwd=tiles, interpret=True)
    o, lse = mod._forward(q, k, v, seg_BT, cfg)
    o_ref, lse_ref = reference.attention_with_lse(q, k, v, segment_ids_BT=seg_BT, causal=True)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(lse.reshape(B, N, T), lse_ref) < 1e-5
    assert float(np.max(lse)) > MASK_VALUE  # every row saw at least itself


def scan_remat_value_and_grads(attn, B, T, N, K, H, L, seed=11):
    """L looped 'layers' through lax.scan with a rematerialised attention block: (loss, d/dw, d/dq) for attn
    and for the reference on the same inputs."""
    q, k, v, seg_BT, _ = make_inputs(seed, B, T, N, K, H, jnp.float32, seg=True)
    w_LHH = jax.random.normal(jax.random.PRNGKey(3), (L, H, H)) / np.sqrt(H)

    def loss(w_LHH, q, attn):
        def layer(x_BTNH, w_HH):
            blk = jax.checkpoint(lambda x: attn(x @ w_HH, k, v, segment_ids_BT=seg_BT, causal=True))
            return x_BTNH + blk(x_BTNH), None

        x, _ = jax.lax.scan(layer, q, w_LHH)
        return jnp.sum(jnp.sin(x))

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda w, q: loss(w, q, fn), argnums=(0, 1)))(w_LHH, q)

    return run(attn), run(reference.attention)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_inside_scan_checkpoint_grad(kernel):
    kern = functools.partial(KERNELS[kernel], block_q=16, block_k=16, interpret=True)
    (val, grads), (val_ref, grads_ref) = scan_remat_value_and_grads(kern, B=1, T=20, N=2, K=1, H=32, L=2)
    assert abs(float(val) - float(val_ref)) < 1e-4 * abs(float(val_ref)) + 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_default_blocks_and_short_sequence(kernel):
    """No block sizes given: table defaults, clamped so T=5 is not padded to 128+."""
    q, k, v, _, _ = make_inputs(5, 1, 5, 2, 2, 64, jnp.float32, seg=False)
    o = KERNELS[kernel](q, k, v, causal=True, interpret=True)
    assert rel_err(o, reference.attention(q, k, v, causal=True)) < 1e-5


def test_interpret_defaults_on_cpu():
    q, k, v, _, _ = make_inputs(2, 1, 8, 1, 1, 32, jnp.float32, seg=False)
    o = flash_gpu.flash_attention(q, k, v, block_q=16, block_k=16)  # interpret=None -> True on CPU
    assert rel_err(o, reference.attention(q, k, v)) < 1e-5


def test_reference_matches_xla_impl():
    from asura.model.attention import xla_attention

    q, k, v, seg_BT, _ = make_inputs(9, 2, 24, 4, 2, 32, jnp.float32, seg=True)
    for causal in (True, False):
        o = reference.attention(q, k, v, segment_ids_BT=seg_BT, causal=causal)
        assert rel_err(xla_attention(q, k, v, segment_ids_BT=seg_BT, causal=causal), o) < 1e-5


@pytest.mark.parametrize(
    ("kernel", "kwargs", "match"),
    [
        ("triton", dict(block_q=24), "powers of 2"),
        ("triton", dict(block_k=8), "powers of 2"),
        ("mosaic", dict(block_q=12), "multiples of 8"),
    ],
)
def test_bad_block_sizes_raise(kernel, kwargs, match):
    q, k, v, _, _ = make_inputs(1, 1, 8, 1, 1, 32, jnp.float32, seg=False)
    with pytest.raises(ValueError, match=match):
        KERNELS[kernel](q, k, v, interpret=True, **kwargs)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bad_shapes_raise(kernel):
    q, k, v, _, _ = make_inputs(1, 1, 8, 3, 2, 32, jnp.float32, seg=False)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        KERNELS[kernel](q, k, v, interpret=True)
    q, k, v, _, _ = make_inputs(1, 1, 8, 1, 1, 512, jnp.float32, seg=False)
    with pytest.raises(ValueError, match="head_dim"):
        KERNELS[kernel](q, k, v, interpret=True)


def test_cost_estimate_counts_causal_half():
    from asura.kernels.common import cost_estimate

    q = jax.ShapeDtypeStruct((2, 64, 4, 32), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 64, 2, 32), jnp.bfloat16)
    full, causal = cost_estimate(q, k, causal=False), cost_estimate(q, k, causal=True)
    assert full.flops == 4 * 2 * 4 * 64 * 64 * 32 and causal.flops == full.flops // 2
    assert cost_estimate(q, k, causal=True, backward=True).flops == causal.flops * 5 // 2


# ---- The shared core (common.py) on its own: facts as data, tile rules, plumbing helpers ----

BACKENDS = {"triton": flash_gpu, "mosaic": flash_tpu}


def test_default_row_is_the_head_dim_bucket():
    # The rules each backend had spelled out before they shared default_row: pad H to a power of 2,
    # then clamp to the table (GPU buckets 32..256, TPU buckets 64..256).
    for H in range(1, 257):
        gpu_bucket = max(32, C.next_pow2(H))
        tpu_bucket = min(256, max(64, C.next_pow2(H)))
        assert C.default_row(flash_gpu.DEFAULT_BLOCKS, H) is flash_gpu.DEFAULT_BLOCKS[gpu_bucket], H
        assert C.default_row(flash_tpu.DEFAULT_BLOCKS, H) is flash_tpu.DEFAULT_BLOCKS[tpu_bucket], H


@pytest.mark.parametrize(
    ("kernel", "legal", "illegal", "cover"),
    [
        # Triton: powers of 2 >= 16; a tile covering n rows is the next power of 2, at least 16.
        ("triton", [16, 32, 64, 256], [0, 8, 24, 48, 96, -16], {1: 16, 16: 16, 17: 32, 100: 128, 1000: 1024}),
        # Mosaic: multiples of 8; a tile covering n rows is n rounded up to 8.
        ("mosaic", [8, 24, 136, 512], [0, 4, 12, 100, -8], {1: 8, 8: 8, 37: 40, 1000: 1000}),
    ],
)
def test_tile_rules(kernel, legal, illegal, cover):
    rule = BACKENDS[kernel].TILES
    assert [rule.legal(b) for b in legal] == [True] * len(legal)
    assert [rule.legal(b) for b in illegal] == [False] * len(illegal)
    assert {n: rule.cover(n) for n in cover} == cover


def test_resolve_tiles_shrinks_to_the_sequence_and_overrides_launch_knobs():
    gpu, tpu = flash_gpu._BACKEND, flash_tpu._BACKEND
    row = (128, 64, 4, 3)
    assert C.resolve_tiles(gpu, row, None, None, 1000, 1000) == C.Tiles(128, 64, (4, 3))
    assert C.resolve_tiles(gpu, row, None, None, 5, 40) == C.Tiles(16, 64, (4, 3))  # T=5 is not padded to 128
    assert C.resolve_tiles(gpu, row, 32, None, 1000, 1000, (8, None)) == C.Tiles(32, 64, (8, 3))
    assert C.resolve_tiles(tpu, (512, 512), None, 24, 37, 1000) == C.Tiles(40, 24, ())
    with pytest.raises(ValueError, match="flash_tpu: blocks must be multiples of 8, got block_q=512 block_k=20"):
        C.resolve_tiles(tpu, (512, 512), None, 20, 37, 37)


def test_entry_builds_the_config_from_table_and_request(monkeypatch):
    seen = []
    backend = dataclasses.replace(flash_gpu._BACKEND, flash=lambda q, k, v, seg, cfg: seen.append(cfg) or q)
    q = jnp.zeros((1, 300, 2, 48), jnp.bfloat16)
    C.flash_attention(backend, q, q, q, block_k=32, launch=(None, 5), interpret=True)
    (cfg,) = seen
    fwd, bwd = flash_gpu.DEFAULT_BLOCKS[64]["fwd"], flash_gpu.DEFAULT_BLOCKS[64]["bwd"]
    assert (cfg.T, cfg.S, cfg.H, cfg.causal, cfg.interpret) == (300, 300, 48, True, True)
    assert cfg.fwd == C.Tiles(fwd[0], 32, (fwd[2], 5)) and cfg.bwd == C.Tiles(bwd[0], 32, (bwd[2], 5))


@pytest.mark.parametrize(
    ("kernel", "H", "dtype", "why"),
    [
        ("triton", 256, jnp.float16, "ok"),
        ("triton", 257, jnp.bfloat16, "head_dim 257 > 256 (Triton tiles would not fit in shared memory)"),
        ("triton", 64, jnp.int8, "dtype int8 not in float32/bfloat16/float16"),
        ("mosaic", 256, jnp.bfloat16, "ok"),
        ("mosaic", 512, jnp.float32, "head_dim 512 > 256"),
        ("mosaic", 64, jnp.float16, "dtype float16 not in float32/bfloat16"),
    ],
)
def test_supports_reads_the_backend_limits(kernel, H, dtype, why):
    mod = BACKENDS[kernel]
    assert mod.LIMITS.max_head_dim == mod.MAX_HEAD_DIM
    assert mod.supports((1, 8, 2, H), (1, 8, 1, H), dtype) == (why == "ok", why)


def test_group_sum_adds_each_kv_heads_query_heads():
    B, S, K, G, H = 2, 5, 3, 4, 8
    # Small integers: every sum order gives the same exact fp32 result, so the oracle can loop.
    x_BSNH = jax.random.randint(jax.random.PRNGKey(0), (B, S, K * G, H), -8, 8).astype(jnp.float32)
    want = np.zeros((B, S, K, H), np.float32)
    for n in range(K * G):
        want[:, :, n // G] += np.asarray(x_BSNH[:, :, n])  # GQA: query head n reads kv head n // G
    got = C.group_sum(x_BSNH, K, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    assert C.partials_dtype(G, jnp.bfloat16) == jnp.float32 and C.partials_dtype(1, jnp.bfloat16) == jnp.bfloat16


@pytest.mark.parametrize(("bq", "bk"), [(16, 16), (32, 16), (16, 32), (24, 40), (128, 64)])
def test_causal_block_ranges_match_brute_force(bq, bk):
    T = S = 200
    n_q, n_k = -(-T // bq), -(-S // bk)
    for i in range(n_q):
        seen = [j for j in range(n_k) if (i + 1) * bq - 1 >= j * bk]  # last query row of i reaches key j*bk
        assert int(C.causal_k_end(jnp.int32(i), bq, bk, n_k)) == max(seen) + 1, i
    for j in range(n_k):
        seen_by = [i for i in range(n_q) if (i + 1) * bq - 1 >= j * bk]
        assert int(C.first_q_block(jnp.int32(j), bq, bk)) == min(seen_by), j


def test_segment_padding_and_ref_unpacking():
    seg_BT = jnp.array([[3, 3, 1]], jnp.int32)
    q_seg, k_seg = C.pad_segments(seg_BT, 4, 8)
    np.testing.assert_array_equal(q_seg, [[3, 3, 1, 0]])
    np.testing.assert_array_equal(k_seg, [[3, 3, 1, 0, 0, 0, 0, 0]])
    assert C.pad_segments(None, 4, 8) == []
    assert C.split_refs(["q", "k", "v", "qs", "ks", "o", "lse"], 3, True) == (
        ("q", "k", "v"),
        ("qs", "ks"),
        ("o", "lse"),
    )
    assert C.split_refs(["q", "k", "v", "o", "lse"], 3, False) == (("q", "k", "v"), (None, None), ("o", "lse"))


def test_kv_len_only_when_keys_are_padded():
    cfg = C.FlashConfig(causal=True, T=37, S=37, H=32, fwd=C.Tiles(16, 16), bwd=C.Tiles(16, 16), interpret=True)
    assert cfg.kv_len(16) == 37 and dataclasses.replace(cfg, S=32).kv_len(16) is None


@pytest.mark.slow
def test_mosaic_kernel_under_tpu_simulator_with_nan_poisoned_memory():
    """TPU-memory simulator: uninitialised buffers read as NaN, so any unwritten output/scratch shows up."""
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    q, k, v, seg_BT, do = make_inputs(13, 1, 20, 2, 1, 32, jnp.float32, seg=True)
    fn = functools.partial(flash_tpu.flash_attention, block_q=16, block_k=16, interpret=params)
    o, grads = _out_and_grads(fn, q, k, v, seg_BT, do, True)
    o_ref, grads_ref = _out_and_grads(reference.attention, q, k, v, seg_BT, do, True)
    assert rel_err(o, o_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5
