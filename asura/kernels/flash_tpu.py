"""Flash attention for TPU: Pallas with the Mosaic lowering (runs on CPU with interpret=True).

Inputs are transposed to BNTH so every tile's trailing dims are (seq, head_dim),
the (8, 128)-friendly layout Mosaic wants. The grid is (B, N, q blocks, k blocks)
with the k axis "arbitrary" (a reduction carried in VMEM scratch m, l, acc) and
the rest "parallel". Causally dead tiles are skipped with pl.when, and their
index_map is clamped to the last live tile so the pipeline issues no DMA for them.
Backward: dq kernel (grid ..., q, k) and dk/dv kernel (grid ..., k, q), both
accumulating in VMEM scratch; delta = rowsum(dO*O) is precomputed in JAX (common).
GQA: k/v index kv head n // G; dk/dv are per query head, summed over groups in JAX.
Validation, default tiles, the config and the custom_vjp live in common.py.
"""

from __future__ import annotations

import functools
from typing import Unpack

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from asura.kernels import common as C

# (block_q, block_k) per head dim for fwd and bwd. Priors in the range splash/flash
# attention use on v4/v5; NOT swept on a TPU in this repo yet.
DEFAULT_BLOCKS: dict[int, dict[str, tuple[int, int]]] = {
    64: {"fwd": (512, 512), "bwd": (256, 256)},
    128: {"fwd": (512, 512), "bwd": (256, 256)},
    256: {"fwd": (256, 256), "bwd": (128, 128)},
}
MAX_HEAD_DIM = 256
LIMITS = C.Limits(MAX_HEAD_DIM, ("float32", "bfloat16"))
# Mosaic: sublane-aligned tiles; one covering the whole (padded) sequence is always legal.
TILES = C.TileRule(align=8)
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _live(i, j, bq: int, bk: int, causal: bool):
    # Tile (i, j) has a visible pair iff its last query row reaches its first key.
    return (i + 1) * bq - 1 >= j * bk if causal else True


def _seg_tiles(qs_ref, ks_ref):
    # Ids arrive pre-shaped [Q, 1] and [1, K] (see _prep): loaded as they are, no in-kernel relayout.
    return (qs_ref[...], ks_ref[...]) if qs_ref is not None else (None, None)


def _fwd_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_k: int, precision):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), outs = C.split_refs(refs, 3, has_seg)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = outs
    bq, bk, _ = cfg.fwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = C.SoftmaxState.start(*acc_sc.shape)

    @pl.when(_live(i, j, bq, bk, cfg.causal))
    def _step():
        s_QK = C.dot(q_ref[...], k_ref[...], C.NT, precision) * cfg.scale
        mask = cfg.mask(cfg.fwd, i, j, *_seg_tiles(qs_ref, ks_ref))
        state = C.SoftmaxState(m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = C.online_softmax_step(s_QK, v_ref[...], mask, state, precision)

    @pl.when(j == n_k - 1)
    def _finish():
        o_QH, lse_Q1 = C.finalize(C.SoftmaxState(m_sc[...], l_sc[...], acc_sc[...]))
        o_ref[...] = o_QH.astype(o_ref.dtype)
        lse_ref[...] = lse_Q1


def _p_ds(q_QH, k_KH, v_KH, do_QH, lse_ref, dl_ref, segs, i, j, cfg: C.FlashConfig, precision) -> C.BlockGrads:
    """Recomputed probabilities and score gradients of block (i, j): shared by dq and dk/dv."""
    mask = cfg.mask(cfg.bwd, i, j, *_seg_tiles(*segs))
    return C.recompute_p_ds(q_QH, k_KH, v_KH, do_QH, lse_ref[...], dl_ref[...], mask, cfg.scale, precision)


def _dq_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_k: int, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), segs, (dq_ref, dq_sc) = C.split_refs(refs, 6, has_seg)
    bq, bk, _ = cfg.bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_live(i, j, bq, bk, cfg.causal))
    def _step():
        k_KH = k_ref[...]
        _, ds_QK = _p_ds(q_ref[...], k_KH, v_ref[...], do_ref[...], lse_ref, dl_ref, segs, i, j, cfg, precision)
        dq_sc[...] += C.dot(ds_QK.astype(k_KH.dtype), k_KH, C.NN, precision)

    @pl.when(j == n_k - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_q: int, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), segs, outs = C.split_refs(refs, 6, has_seg)
    dk_ref, dv_ref, dk_sc, dv_sc = outs
    bq, bk, _ = cfg.bwd
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_live(i, j, bq, bk, cfg.causal))
    def _step():
        q_QH, do_QH = q_ref[...], do_ref[...]
        p_QK, ds_QK = _p_ds(q_QH, k_ref[...], v_ref[...], do_QH, lse_ref, dl_ref, segs, i, j, cfg, precision)
        # Explicit .T: Mosaic matmuls natively take a transposed rhs, not lhs.
        dv_sc[...] += C.dot(p_QK.T.astype(do_QH.dtype), do_QH, C.NN, precision)
        dk_sc[...] += C.dot(ds_QK.T.astype(q_QH.dtype), q_QH, C.NN, precision)

    @pl.when(i == n_q - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(G, H, bq, bk, n_k, causal, has_seg, *, k_inner: bool):
    """BlockSpecs over BNTH arrays for grid (B, N, outer, inner); causal dead tiles re-use the last live index."""
    if k_inner:  # grid (b, n, i, j)
        qi = lambda b, n, i, j: i
        kj = (
            (lambda b, n, i, j: jnp.minimum(j, C.causal_k_end(i, bq, bk, n_k) - 1))
            if causal
            else (lambda b, n, i, j: j)
        )
    else:  # grid (b, n, j, i)
        qi = (lambda b, n, j, i: jnp.maximum(i, C.first_q_block(j, bq, bk))) if causal else (lambda b, n, j, i: i)
        kj = lambda b, n, j, i: j

    def idx(fn, head, tail):
        return lambda b, n, x, y: (b, *head(n), fn(b, n, x, y), *tail)

    q_spec = pl.BlockSpec((None, None, bq, H), idx(qi, lambda n: (n,), (0,)))
    kv_spec = pl.BlockSpec((None, None, bk, H), idx(kj, lambda n: (n // G,), (0,)))
    row_spec = pl.BlockSpec((None, None, bq, 1), idx(qi, lambda n: (n,), (0,)))
    seg = []
    if has_seg:  # q ids as [B, T, 1] (sublanes), kv ids as [B, 1, S] (lanes): no in-kernel relayout.
        seg = [
            pl.BlockSpec((None, bq, 1), idx(qi, lambda n: (), (0,))),
            pl.BlockSpec((None, 1, bk), lambda b, n, x, y: (b, 0, kj(b, n, x, y))),
        ]
    return q_spec, kv_spec, row_spec, seg


def _prep(q, k, v, seg, cfg: C.FlashConfig, tiles: C.Tiles):
    """Sequences padded to whole blocks and moved next to the head dim (BTNH -> BNTH); head dim unpadded."""
    Tp, Sp = C.round_up(cfg.T, tiles.block_q), C.round_up(cfg.S, tiles.block_k)
    q_BNTH = C.pad_axis(q, 1, Tp).transpose(0, 2, 1, 3)
    k_BKSH = C.pad_axis(k, 1, Sp).transpose(0, 2, 1, 3)
    v_BKSH = C.pad_axis(v, 1, Sp).transpose(0, 2, 1, 3)
    # q ids [B, Tp, 1] on sublanes, kv ids [B, 1, Sp] on lanes, matching _specs.
    segs = [jnp.expand_dims(ids, axis) for ids, axis in zip(C.pad_segments(seg, Tp, Sp), (2, 1))]
    return q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp


def _forward(q, k, v, seg, cfg: C.FlashConfig) -> C.Forward:
    B, _, N, H = q.shape
    G = N // k.shape[2]
    bq, bk, _ = cfg.fwd
    q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp = _prep(q, k, v, seg, cfg, cfg.fwd)
    n_q, n_k = Tp // bq, Sp // bk
    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_k, cfg.causal, seg is not None, k_inner=True)
    o_BNTH, lse_BNT1 = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_seg=seg is not None, n_k=n_k, precision=C.precision_for(q.dtype)),
        grid=(B, N, n_q, n_k),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q_BNTH.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32)],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, H), jnp.float32),
        ],
        compiler_params=_PARAMS,
        cost_estimate=C.cost_estimate(q, k, causal=cfg.causal),
        interpret=cfg.interpret,
        name="flash_fwd_tpu",
    )(q_BNTH, k_BKSH, v_BKSH, *segs)
    return C.Forward(o_BNTH[:, :, : cfg.T].transpose(0, 2, 1, 3), lse_BNT1[:, :, : cfg.T])


def _backward(q, k, v, seg, lse_BNT1, do, delta_BNT, cfg: C.FlashConfig) -> C.Grads:
    B, _, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk, _ = cfg.bwd
    q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp = _prep(q, k, v, seg, cfg, cfg.bwd)
    n_q, n_k = Tp // bq, Sp // bk
    do_BNTH = C.pad_axis(do, 1, Tp).transpose(0, 2, 1, 3)
    delta_BNT1 = delta_BNT[..., None]
    args = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, C.pad_axis(lse_BNT1, 2, Tp), C.pad_axis(delta_BNT1, 2, Tp), *segs)
    has_seg, prec = seg is not None, C.precision_for(q.dtype)
    cost = C.cost_estimate(q, k, causal=cfg.causal, backward=True)

    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_k, cfg.causal, has_seg, k_inner=True)
    dq_BNTH = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, n_k=n_k, precision=prec),
        grid=(B, N, n_q, n_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        compiler_params=_PARAMS,
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dq_tpu",
    )(*args)

    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_k, cfg.causal, has_seg, k_inner=False)
    out_spec = pl.BlockSpec((None, None, bk, H), lambda b, n, j, i: (b, n, j, 0))
    dk_BNSH, dv_BNSH = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg, n_q=n_q, precision=prec),
        grid=(B, N, n_k, n_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((B, N, Sp, H), C.partials_dtype(G, k.dtype))] * 2,
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        compiler_params=_PARAMS,
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dkdv_tpu",
    )(*args)

    def unpad_BTNH(x_BNTH, T):
        return x_BNTH[:, :, :T].transpose(0, 2, 1, 3)

    return C.Grads(
        unpad_BTNH(dq_BNTH, cfg.T),
        C.group_sum(unpad_BTNH(dk_BNSH, cfg.S), K, k.dtype),
        C.group_sum(unpad_BTNH(dv_BNSH, cfg.S), K, k.dtype),
    )


_BACKEND = C.Backend("flash_tpu", LIMITS, DEFAULT_BLOCKS, TILES, C.flash_custom_vjp(_forward, _backward))
supports = LIMITS.supports


def flash_attention(
    q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, **options: Unpack[C.FlashOptions]
) -> jax.Array:
    """Causal/segmented GQA flash attention, BTNH in and out; fp32 accumulation, output in q's dtype.

    options (segment_ids_BT, causal, block sizes, interpret) are common.FlashOptions.
    """
    return C.flash_attention(_BACKEND, q_BTNH, k_BSKH, v_BSKH, **options)
