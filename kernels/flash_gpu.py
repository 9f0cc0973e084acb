"""Flash attention for GPU: Pallas with the Triton lowering (runs on CPU with interpret=True).

Forward: grid (B, N, q blocks); each program keeps its q tile resident and loops
over k/v tiles with an online softmax, emitting o and the logsumexp residual.
Backward (FlashAttention-2 split): delta = rowsum(dO*O) in plain JAX, then a
dk/dv kernel (grid over k blocks, loop over q blocks) and a dq kernel (grid over
q blocks, loop over k blocks). Causal loops stop/start at the diagonal block.

GQA: k/v BlockSpecs index kv head n // G. dk/dv are produced per query head
and summed over the G group heads in JAX (simple, costs G x dk/dv memory).
Triton needs power-of-2 tiles >= 16, so the head dim is zero-padded to one
(exact: zeros add nothing to q.k and padded v columns are sliced away).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from asura.kernels import common as C
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

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


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    T: int
    S: int
    H: int  # true head dim (sets the 1/sqrt(H) scale)
    fwd: tuple[int, int, int, int]
    bwd: tuple[int, int, int, int]
    interpret: bool


def _blocks(req_q: int | None, req_k: int | None, default: tuple[int, int, int, int], T: int, S: int, warps, stages):
    bq, bk, nw, ns = default
    bq, bk = req_q or bq, req_k or bk
    if bq & (bq - 1) or bk & (bk - 1) or min(bq, bk) < 16:
        raise ValueError(f"GPU flash blocks must be powers of 2 >= 16, got block_q={bq} block_k={bk}")
    # Short sequences: shrink tiles instead of padding T=1 up to 128.
    bq, bk = min(bq, max(16, C.next_pow2(T))), min(bk, max(16, C.next_pow2(S)))
    return bq, bk, warps or nw, stages or ns


def _params(cfg_blocks):
    _, _, nw, ns = cfg_blocks
    return pltriton.CompilerParams(num_warps=nw, num_stages=ns)


def _causal_kv_end(i, block_q: int, block_k: int, n_k: int):
    # Last visible key of q block i is (i+1)*bq - 1 (causal, top-left aligned).
    return jnp.minimum(lax.div((i + 1) * block_q + block_k - 1, block_k), n_k)


def _fwd_kernel(*refs, cfg: _Cfg, has_seg: bool, n_k: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = cfg.fwd[:2]
    i = pl.program_id(2)
    q_QH = q_ref[...]
    q_seg_Q1 = qs_ref[...].reshape(bq, 1) if has_seg else None
    kv_len = cfg.S if n_k * bk != cfg.S else None
    scale = C.scale_for(cfg.H)

    def body(j, carry):
        m_Q1, l_Q1, acc_QH = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_KH, v_KH = k_ref[ks, :], v_ref[ks, :]
        s_QK = C.dot(q_QH, k_KH, C.NT, precision) * scale
        k_seg_1K = ks_ref[ks].reshape(1, bk) if has_seg else None
        mask = C.block_mask(
            i * bq, j * bk, bq, bk, causal=cfg.causal, kv_len=kv_len, q_seg_Q1=q_seg_Q1, k_seg_1K=k_seg_1K
        )
        return C.online_softmax_step(s_QK, v_KH, mask, m_Q1, l_Q1, acc_QH, precision)

    end = _causal_kv_end(i, bq, bk, n_k) if cfg.causal else n_k
    init = (
        jnp.full((bq, 1), C.MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros(q_QH.shape, jnp.float32),
    )
    m_Q1, l_Q1, acc_QH = lax.fori_loop(0, end, body, init)
    o_QH, lse_Q1 = C.finalize(m_Q1, l_Q1, acc_QH)
    o_ref[...] = o_QH.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1.reshape(bq)


def _dq_kernel(*refs, cfg: _Cfg, has_seg: bool, n_k: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = cfg.bwd[:2]
    i = pl.program_id(2)
    q_QH, do_QH = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...].reshape(bq, 1), dl_ref[...].reshape(bq, 1)
    q_seg_Q1 = qs_ref[...].reshape(bq, 1) if has_seg else None
    kv_len = cfg.S if n_k * bk != cfg.S else None
    scale = C.scale_for(cfg.H)

    def body(j, dq_QH):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_KH, v_KH = k_ref[ks, :], v_ref[ks, :]
        s_QK = C.dot(q_QH, k_KH, C.NT, precision) * scale
        dp_QK = C.dot(do_QH, v_KH, C.NT, precision)
        k_seg_1K = ks_ref[ks].reshape(1, bk) if has_seg else None
        mask = C.block_mask(
            i * bq, j * bk, bq, bk, causal=cfg.causal, kv_len=kv_len, q_seg_Q1=q_seg_Q1, k_seg_1K=k_seg_1K
        )
        _, ds_QK = C.recompute_p_ds(s_QK, dp_QK, lse_Q1, delta_Q1, mask)
        return dq_QH + C.dot(ds_QK.astype(k_KH.dtype), k_KH, C.NN, precision)

    end = _causal_kv_end(i, bq, bk, n_k) if cfg.causal else n_k
    dq_QH = lax.fori_loop(0, end, body, jnp.zeros(q_QH.shape, jnp.float32))
    dq_ref[...] = (dq_QH * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Cfg, has_seg: bool, n_q: int, n_k: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = cfg.bwd[:2]
    j = pl.program_id(2)
    k_KH, v_KH = k_ref[...], v_ref[...]
    k_seg_1K = ks_ref[...].reshape(1, bk) if has_seg else None
    kv_len = cfg.S if n_k * bk != cfg.S else None
    scale = C.scale_for(cfg.H)

    def body(i, carry):
        dk_KH, dv_KH = carry
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_QH, do_QH = q_ref[qs, :], do_ref[qs, :]
        lse_Q1, delta_Q1 = lse_ref[qs].reshape(bq, 1), dl_ref[qs].reshape(bq, 1)
        s_QK = C.dot(q_QH, k_KH, C.NT, precision) * scale
        dp_QK = C.dot(do_QH, v_KH, C.NT, precision)
        q_seg_Q1 = qs_ref[qs].reshape(bq, 1) if has_seg else None
        mask = C.block_mask(
            i * bq, j * bk, bq, bk, causal=cfg.causal, kv_len=kv_len, q_seg_Q1=q_seg_Q1, k_seg_1K=k_seg_1K
        )
        p_QK, ds_QK = C.recompute_p_ds(s_QK, dp_QK, lse_Q1, delta_Q1, mask)
        dv_KH = dv_KH + C.dot(p_QK.astype(do_QH.dtype), do_QH, C.TN, precision)
        dk_KH = dk_KH + C.dot(ds_QK.astype(q_QH.dtype), q_QH, C.TN, precision)
        return dk_KH, dv_KH

    # Causal: q blocks strictly above this k block's first row see none of it.
    start = lax.div(j * bk, bq) if cfg.causal else 0
    zeros = jnp.zeros(k_KH.shape, jnp.float32)
    dk_KH, dv_KH = lax.fori_loop(start, n_q, body, (zeros, zeros))
    dk_ref[...] = (dk_KH * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KH.astype(dv_ref.dtype)


def _specs(B, N, G, Tp, Sp, Hp, bq, bk, has_seg, *, q_tiled: bool):
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


def _pad_inputs(q, k, v, seg, cfg: _Cfg, bq: int, bk: int):
    Tp, Sp, Hp = C.round_up(cfg.T, bq), C.round_up(cfg.S, bk), max(16, C.next_pow2(cfg.H))
    q = C.pad_axis(C.pad_axis(q, 1, Tp), 3, Hp)
    k = C.pad_axis(C.pad_axis(k, 1, Sp), 3, Hp)
    v = C.pad_axis(C.pad_axis(v, 1, Sp), 3, Hp)
    segs = [] if seg is None else [C.pad_axis(seg, 1, Tp), C.pad_axis(seg, 1, Sp)]
    return q, k, v, segs, Tp, Sp, Hp


def _forward(q, k, v, seg, cfg: _Cfg):
    B, _, N, _ = q.shape
    G = N // k.shape[2]
    bq, bk = cfg.fwd[:2]
    q_p, k_p, v_p, segs, Tp, Sp, Hp = _pad_inputs(q, k, v, seg, cfg, bq, bk)
    q_spec, kv_spec, row_spec, seg_specs = _specs(B, N, G, Tp, Sp, Hp, bq, bk, seg is not None, q_tiled=True)
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
    return o_p[:, : cfg.T, :, : cfg.H], lse_BNT[:, :, : cfg.T]


def _backward(q, k, v, seg, o, lse_BNT, do, cfg: _Cfg):
    B, _, N, _ = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = cfg.bwd[:2]
    delta_BNT = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))
    q_p, k_p, v_p, segs, Tp, Sp, Hp = _pad_inputs(q, k, v, seg, cfg, bq, bk)
    do_p = C.pad_axis(C.pad_axis(do.astype(q.dtype), 1, Tp), 3, Hp)
    lse_p, delta_p = C.pad_axis(lse_BNT, 2, Tp), C.pad_axis(delta_BNT, 2, Tp)
    args = (q_p, k_p, v_p, do_p, lse_p, delta_p, *segs)
    has_seg, prec, n_q, n_k = seg is not None, C.precision_for(q.dtype), Tp // bq, Sp // bk
    cost = C.cost_estimate(q, k, causal=cfg.causal, backward=True)

    q_spec, kv_spec, row_spec, seg_specs = _specs(B, N, G, Tp, Sp, Hp, bq, bk, has_seg, q_tiled=True)
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

    q_spec, kv_spec, row_spec, seg_specs = _specs(B, N, G, Tp, Sp, Hp, bq, bk, has_seg, q_tiled=False)
    # Per-query-head dk/dv (fp32 when G > 1 so the group sum stays exact), grid over k blocks.
    dkv_dtype = jnp.float32 if G > 1 else k.dtype
    out_spec = pl.BlockSpec((None, bk, None, Hp), lambda b, n, j: (b, j, n, 0))
    dk_p, dv_p = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg, n_q=n_q, n_k=n_k, precision=prec),
        grid=(B, N, n_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Sp, N, Hp), dkv_dtype)] * 2,
        compiler_params=_params(cfg.bwd),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dkdv_gpu",
    )(*args)

    def group_sum(x_BSNH):
        x_BSNH = x_BSNH[:, : cfg.S, :, : cfg.H]
        return x_BSNH.reshape(B, cfg.S, K, G, cfg.H).sum(3).astype(k.dtype)

    return dq_p[:, : cfg.T, :, : cfg.H], group_sum(dk_p), group_sum(dv_p)


_flash = C.flash_custom_vjp(_forward, _backward)


def supports(q_shape, k_shape, dtype) -> tuple[bool, str]:
    H = q_shape[-1]
    if H > MAX_HEAD_DIM:
        return False, f"head_dim {H} > {MAX_HEAD_DIM} (Triton tiles would not fit in shared memory)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False, f"dtype {jnp.dtype(dtype).name} not in float32/bfloat16/float16"
    return True, "ok"


def flash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    block_q_bwd: int | None = None,
    block_k_bwd: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal/segmented GQA flash attention, BTNH; fp32 accumulation, output in q's dtype."""
    C.validate("flash_gpu", supports, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    T, H, S = q_BTNH.shape[1], q_BTNH.shape[3], k_BSKH.shape[1]
    table = DEFAULT_BLOCKS[max(32, C.next_pow2(H))]
    cfg = _Cfg(
        causal=causal,
        T=T,
        S=S,
        H=H,
        fwd=_blocks(block_q, block_k, table["fwd"], T, S, num_warps, num_stages),
        bwd=_blocks(block_q_bwd or block_q, block_k_bwd or block_k, table["bwd"], T, S, num_warps, num_stages),
        interpret=C.default_interpret(interpret),
    )
    return _flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg)
