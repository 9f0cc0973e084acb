"""Flash attention for GPU: Pallas with the Triton lowering (runs on CPU with interpret=True).

Forward: grid (B, N, q blocks); each program keeps its q tile resident and loops
over k/v tiles with an online softmax, emitting o and the logsumexp residual.
Backward (FlashAttention-2 split): delta = rowsum(dO*O) in plain JAX (common), then a
dk/dv kernel (grid over k blocks, loop over q blocks) and a dq kernel (grid over
q blocks, loop over k blocks). Causal loops stop/start at the diagonal block.

GQA: k/v BlockSpecs index kv head n // G. dk/dv are produced per query head
and summed over the G group heads in JAX (simple, costs G x dk/dv memory).
Triton needs power-of-2 tiles >= 16 (TILES), so the head dim is zero-padded to one
(exact: zeros add nothing to q.k and padded v columns are sliced away).
Validation, default tiles, the config and the custom_vjp live in common.py.
"""

from __future__ import annotations

import functools
from typing import Unpack

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from asura.kernels import common as C

# Defaults per padded head dim: (block_q, block_k, num_warps, num_stages) for fwd and bwd.
# Priors from published Triton/Pallas flash configs for A100/H100; NOT yet swept on our H100
# (bench/RESULTS.md is pending), so treat them as starting points.
DEFAULT_BLOCKS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    32: {"fwd": (128, 64, 4, 3), "bwd": (64, 64, 4, 2)},
    64: {"fwd": (128, 64, 4, 3), "bwd": (64, 64, 4, 2)},
    128: {"fwd": (128, 64, 8, 2), "bwd": (64, 64, 8, 2)},
    256: {"fwd": (64, 32, 8, 2), "bwd": (32, 32, 8, 1)},
}
MAX_HEAD_DIM = 256
LIMITS = C.Limits(MAX_HEAD_DIM, ("float32", "bfloat16", "float16"), "Triton tiles would not fit in shared memory")
TILES = C.TileRule(align=16, pow2=True)  # Triton: every tile dim a power of 2, and dots need >= 16


def _params(tiles: C.Tiles) -> pltriton.CompilerParams:
    num_warps, num_stages = tiles.launch
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _fwd_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_k: int, precision):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref) = C.split_refs(refs, 3, has_seg)
    bq, bk, _ = cfg.fwd
    i = pl.program_id(2)
    q_QH = q_ref[...]
    q_seg_Q1 = qs_ref[...].reshape(bq, 1) if has_seg else None

    def body(j, state):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s_QK = C.dot(q_QH, k_ref[ks, :], C.NT, precision) * cfg.scale
        mask = cfg.mask(cfg.fwd, i, j, q_seg_Q1, ks_ref[ks].reshape(1, bk) if has_seg else None)
        return C.online_softmax_step(s_QK, v_ref[ks, :], mask, state, precision)

    end = C.causal_k_end(i, bq, bk, n_k) if cfg.causal else n_k
    state = lax.fori_loop(0, end, body, C.SoftmaxState.start(bq, q_QH.shape[1]))
    o_QH, lse_Q1 = C.finalize(state)
    o_ref[...] = o_QH.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1.reshape(bq)


def _dq_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_k: int, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), (qs_ref, ks_ref), (dq_ref,) = C.split_refs(refs, 6, has_seg)
    bq, bk, _ = cfg.bwd
    i = pl.program_id(2)
    q_QH, do_QH = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...].reshape(bq, 1), dl_ref[...].reshape(bq, 1)
    q_seg_Q1 = qs_ref[...].reshape(bq, 1) if has_seg else None

    def body(j, dq_QH):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_KH = k_ref[ks, :]
        mask = cfg.mask(cfg.bwd, i, j, q_seg_Q1, ks_ref[ks].reshape(1, bk) if has_seg else None)
        grads = C.recompute_p_ds(q_QH, k_KH, v_ref[ks, :], do_QH, lse_Q1, delta_Q1, mask, cfg.scale, precision)
        return dq_QH + C.dot(grads.ds_QK.astype(k_KH.dtype), k_KH, C.NN, precision)

    end = C.causal_k_end(i, bq, bk, n_k) if cfg.causal else n_k
    dq_QH = lax.fori_loop(0, end, body, jnp.zeros(q_QH.shape, jnp.float32))
    dq_ref[...] = (dq_QH * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: C.FlashConfig, has_seg: bool, n_q: int, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), (qs_ref, ks_ref), (dk_ref, dv_ref) = C.split_refs(refs, 6, has_seg)
    bq, bk, _ = cfg.bwd
    j = pl.program_id(2)
    k_KH, v_KH = k_ref[...], v_ref[...]
    k_seg_1K = ks_ref[...].reshape(1, bk) if has_seg else None

    def body(i, carry):
        dk_KH, dv_KH = carry
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_QH, do_QH = q_ref[qs, :], do_ref[qs, :]
        lse_Q1, delta_Q1 = lse_ref[qs].reshape(bq, 1), dl_ref[qs].reshape(bq, 1)
        mask = cfg.mask(cfg.bwd, i, j, qs_ref[qs].reshape(bq, 1) if has_seg else None, k_seg_1K)
        p_QK, ds_QK = C.recompute_p_ds(q_QH, k_KH, v_KH, do_QH, lse_Q1, delta_Q1, mask, cfg.scale, precision)
        dv_KH = dv_KH + C.dot(p_QK.astype(do_QH.dtype), do_QH, C.TN, precision)
        dk_KH = dk_KH + C.dot(ds_QK.astype(q_QH.dtype), q_QH, C.TN, precision)
        return dk_KH, dv_KH

    # Causal: q blocks strictly above this k block's first row see none of it.
    start = C.first_q_block(j, bq, bk) if cfg.causal else 0
    zeros = jnp.zeros(k_KH.shape, jnp.float32)
    dk_KH, dv_KH = lax.fori_loop(start, n_q, body, (zeros, zeros))
    dk_ref[...] = (dk_KH * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KH.astype(dv_ref.dtype)


def _specs(G, Tp, Sp, Hp, bq, bk, has_seg, *, q_tiled: bool):
    """BlockSpecs for grid (B, N, blocks): the tiled side gets tiles, the other the whole sequence."""
    tq, tk = (bq, Sp) if q_tiled else (Tp, bk)
    qi = (lambda b, n, i: (b, i, n, 0)) if q_tiled else (lambda b, n, i: (b, 0, n, 0))
    ki = (lambda b, n, i: (b, 0, n // G, 0)) if q_tiled else (lambda b, n, i: (b, i, n // G, 0))
    q_spec = pl.BlockSpec((None, tq, None, Hp), qi)
    kv_spec = pl.BlockSpec((None, tk, None, Hp), ki)
    row_spec = pl.BlockSpec((None, None, tq), (lambda b, n, i: (b, n, i)) if q_tiled else (lambda b, n, i: (b, n, 0)))
    seg = []
    if has_seg:
        seg = [
            pl.BlockSpec((None, tq), (lambda b, n, i: (b, i)) if q_tiled else (lambda b, n, i: (b, 0))),
            pl.BlockSpec((None, tk), (lambda b, n, i: (b, 0)) if q_tiled else (lambda b, n, i: (b, i))),
        ]
    return q_spec, kv_spec, row_spec, seg


def _pad_inputs(q, k, v, seg, cfg: C.FlashConfig, tiles: C.Tiles):
    """Sequences padded to whole blocks, head dim to a legal Triton tile; layout stays BTNH."""
    Tp, Sp, Hp = C.round_up(cfg.T, tiles.block_q), C.round_up(cfg.S, tiles.block_k), TILES.cover(cfg.H)
    q = C.pad_axis(C.pad_axis(q, 1, Tp), 3, Hp)
    k = C.pad_axis(C.pad_axis(k, 1, Sp), 3, Hp)
    v = C.pad_axis(C.pad_axis(v, 1, Sp), 3, Hp)
    return q, k, v, C.pad_segments(seg, Tp, Sp), Tp, Sp, Hp


def _forward(q, k, v, seg, cfg: C.FlashConfig) -> C.Forward:
    B, _, N, _ = q.shape
    G = N // k.shape[2]
    bq, bk, _ = cfg.fwd
    q_p, k_p, v_p, segs, Tp, Sp, Hp = _pad_inputs(q, k, v, seg, cfg, cfg.fwd)
    q_spec, kv_spec, row_spec, seg_specs = _specs(G, Tp, Sp, Hp, bq, bk, seg is not None, q_tiled=True)
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, has_seg=seg is not None, n_k=Sp // bk, precision=C.precision_for(q.dtype)
    )
    o_p, lse_BNT = pl.pallas_call(
        kernel,
        grid=(B, N, Tp // bq),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q_p.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        compiler_params=_params(cfg.fwd),
        cost_estimate=C.cost_estimate(q, k, causal=cfg.causal),
        interpret=cfg.interpret,
        name="flash_fwd_gpu",
    )(q_p, k_p, v_p, *segs)
    return C.Forward(o_p[:, : cfg.T, :, : cfg.H], lse_BNT[:, :, : cfg.T])


def _backward(q, k, v, seg, lse_BNT, do, delta_BNT, cfg: C.FlashConfig) -> C.Grads:
    B, _, N, _ = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk, _ = cfg.bwd
    q_p, k_p, v_p, segs, Tp, Sp, Hp = _pad_inputs(q, k, v, seg, cfg, cfg.bwd)
    do_p = C.pad_axis(C.pad_axis(do, 1, Tp), 3, Hp)
    args = (q_p, k_p, v_p, do_p, C.pad_axis(lse_BNT, 2, Tp), C.pad_axis(delta_BNT, 2, Tp), *segs)
    has_seg, prec, n_q, n_k = seg is not None, C.precision_for(q.dtype), Tp // bq, Sp // bk
    cost = C.cost_estimate(q, k, causal=cfg.causal, backward=True)

    q_spec, kv_spec, row_spec, seg_specs = _specs(G, Tp, Sp, Hp, bq, bk, has_seg, q_tiled=True)
    dq_p = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, n_k=n_k, precision=prec),
        grid=(B, N, n_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        compiler_params=_params(cfg.bwd),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dq_gpu",
    )(*args)

    # Per-query-head dk/dv, grid over k blocks; summed over each GQA group below.
    q_spec, kv_spec, row_spec, seg_specs = _specs(G, Tp, Sp, Hp, bq, bk, has_seg, q_tiled=False)
    out_spec = pl.BlockSpec((None, bk, None, Hp), lambda b, n, j: (b, j, n, 0))
    dk_p, dv_p = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg, n_q=n_q, precision=prec),
        grid=(B, N, n_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Sp, N, Hp), C.partials_dtype(G, k.dtype))] * 2,
        compiler_params=_params(cfg.bwd),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dkdv_gpu",
    )(*args)

    def unpad(x_BTNH, T):
        return x_BTNH[:, :T, :, : cfg.H]

    return C.Grads(
        unpad(dq_p, cfg.T), C.group_sum(unpad(dk_p, cfg.S), K, k.dtype), C.group_sum(unpad(dv_p, cfg.S), K, k.dtype)
    )


_BACKEND = C.Backend("flash_gpu", LIMITS, DEFAULT_BLOCKS, TILES, C.flash_custom_vjp(_forward, _backward))
supports = LIMITS.supports


def flash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    num_warps: int | None = None,
    num_stages: int | None = None,
    **options: Unpack[C.FlashOptions],
) -> jax.Array:
    """Causal/segmented GQA flash attention, BTNH; fp32 accumulation, output in q's dtype.

    options (segment_ids_BT, causal, block sizes, interpret) are common.FlashOptions; num_warps and
    num_stages override the DEFAULT_BLOCKS Triton launch of both passes.
    """
    return C.flash_attention(_BACKEND, q_BTNH, k_BSKH, v_BSKH, launch=(num_warps, num_stages), **options)
