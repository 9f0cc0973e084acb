"""Flash attention for TPU: Pallas with the Mosaic lowering (runs on CPU with interpret=True).

Inputs are transposed to BNTH so every tile's trailing dims are (seq, head_dim),
the (8, 128)-friendly layout Mosaic wants. The grid is (B, N, q blocks, k blocks)
with the k axis "arbitrary" (a reduction carried in VMEM scratch m, l, acc) and
the rest "parallel". Causally dead tiles are skipped with pl.when, and their
index_map is clamped to the last live tile so the pipeline issues no DMA for them.
Backward: dq kernel (grid ..., q, k) and dk/dv kernel (grid ..., k, q), both
accumulating in VMEM scratch; delta = rowsum(dO*O) is precomputed in JAX.
GQA: k/v index kv head n // G; dk/dv are per query head, summed over groups in JAX.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from asura.kernels import common as C
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# (block_q, block_k) per head dim for fwd and bwd. Priors in the range splash/flash
# attention use on v4/v5; NOT swept on a TPU in this repo yet.
DEFAULT_BLOCKS: dict[int, dict[str, tuple[int, int]]] = {
    64: {"fwd": (512, 512), "bwd": (256, 256)},
    128: {"fwd": (512, 512), "bwd": (256, 256)},
    256: {"fwd": (256, 256), "bwd": (128, 128)},
}
MAX_HEAD_DIM = 256
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    T: int
    S: int
    H: int
    fwd: tuple[int, int]
    bwd: tuple[int, int]
    interpret: bool


def _blocks(req_q, req_k, default, T, S):
    bq, bk = req_q or default[0], req_k or default[1]
    if bq % 8 or bk % 8:
        raise ValueError(f"TPU flash blocks must be multiples of 8, got block_q={bq} block_k={bk}")
    # A block covering the whole (padded) sequence is always a legal Mosaic tile.
    return min(bq, C.round_up(T, 8)), min(bk, C.round_up(S, 8))


def _last_k_block(i, bq: int, bk: int, n_k: int):
    return jnp.minimum(((i + 1) * bq - 1) // bk, n_k - 1)


def _first_q_block(j, bq: int, bk: int):
    return (j * bk) // bq


def _live(i, j, bq: int, bk: int, causal: bool):
    # Tile (i, j) has a visible pair iff its last query row reaches its first key.
    return (i + 1) * bq - 1 >= j * bk if causal else True


def _kv_len(cfg: _Cfg, bk: int):
    return cfg.S if C.round_up(cfg.S, bk) != cfg.S else None


def _fwd_kernel(*refs, cfg: _Cfg, has_seg: bool, n_k: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    bq, bk = cfg.fwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, C.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_live(i, j, bq, bk, cfg.causal))
    def _step():
        k_KH = k_ref[...]
        s_QK = C.dot(q_ref[...], k_KH, C.NT, precision) * C.scale_for(cfg.H)
        mask = C.block_mask(
            i * bq,
            j * bk,
            bq,
            bk,
            causal=cfg.causal,
            kv_len=_kv_len(cfg, bk),
            q_seg_Q1=qs_ref[...] if has_seg else None,
            k_seg_1K=ks_ref[...] if has_seg else None,
        )
        m, l, acc = C.online_softmax_step(s_QK, v_ref[...], mask, m_sc[...], l_sc[...], acc_sc[...], precision)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == n_k - 1)
    def _finish():
        o_QH, lse_Q1 = C.finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o_QH.astype(o_ref.dtype)
        lse_ref[...] = lse_Q1


def _p_ds(q_QH, k_KH, v_KH, do_QH, lse_ref, dl_ref, segs, i, j, cfg: _Cfg, precision):
    """Recomputed probabilities and score gradients of block (i, j): shared by dq and dk/dv."""
    bq, bk = cfg.bwd
    s_QK = C.dot(q_QH, k_KH, C.NT, precision) * C.scale_for(cfg.H)
    dp_QK = C.dot(do_QH, v_KH, C.NT, precision)
    mask = C.block_mask(
        i * bq,
        j * bk,
        bq,
        bk,
        causal=cfg.causal,
        kv_len=_kv_len(cfg, bk),
        q_seg_Q1=segs[0][...] if segs else None,
        k_seg_1K=segs[1][...] if segs else None,
    )
    return C.recompute_p_ds(s_QK, dp_QK, lse_ref[...], dl_ref[...], mask)


def _dq_kernel(*refs, cfg: _Cfg, has_seg: bool, n_k: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, dq_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_sc = refs
    segs = (qs_ref, ks_ref) if has_seg else None
    bq, bk = cfg.bwd
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
        dq_ref[...] = (dq_sc[...] * C.scale_for(cfg.H)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Cfg, has_seg: bool, n_q: int, precision):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    segs = (qs_ref, ks_ref) if has_seg else None
    bq, bk = cfg.bwd
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
        dk_ref[...] = (dk_sc[...] * C.scale_for(cfg.H)).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(G, H, bq, bk, n_q, n_k, causal, has_seg, *, k_inner: bool):
    """BlockSpecs over BNTH arrays for grid (B, N, outer, inner); causal dead tiles re-use the last live index."""
    if k_inner:  # grid (b, n, i, j)
        qi = lambda b, n, i, j: i
        kj = (lambda b, n, i, j: jnp.minimum(j, _last_k_block(i, bq, bk, n_k))) if causal else (lambda b, n, i, j: j)
    else:  # grid (b, n, j, i)
        qi = (lambda b, n, j, i: jnp.maximum(i, _first_q_block(j, bq, bk))) if causal else (lambda b, n, j, i: i)
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


def _prep(q, k, v, seg, cfg: _Cfg, bq: int, bk: int):
    Tp, Sp = C.round_up(cfg.T, bq), C.round_up(cfg.S, bk)
    q_BNTH = C.pad_axis(q, 1, Tp).transpose(0, 2, 1, 3)
    k_BKSH = C.pad_axis(k, 1, Sp).transpose(0, 2, 1, 3)
    v_BKSH = C.pad_axis(v, 1, Sp).transpose(0, 2, 1, 3)
    segs = [] if seg is None else [C.pad_axis(seg, 1, Tp)[:, :, None], C.pad_axis(seg, 1, Sp)[:, None, :]]
    return q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp


def _forward(q, k, v, seg, cfg: _Cfg):
    B, _, N, H = q.shape
    G = N // k.shape[2]
    bq, bk = cfg.fwd
    q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp = _prep(q, k, v, seg, cfg, bq, bk)
    n_q, n_k = Tp // bq, Sp // bk
    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_q, n_k, cfg.causal, seg is not None, k_inner=True)
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
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        cost_estimate=C.cost_estimate(q, k, causal=cfg.causal),
        interpret=cfg.interpret,
        name="flash_fwd_tpu",
    )(q_BNTH, k_BKSH, v_BKSH, *segs)
    return o_BNTH[:, :, : cfg.T].transpose(0, 2, 1, 3), lse_BNT1[:, :, : cfg.T]


def _backward(q, k, v, seg, o, lse_BNT1, do, cfg: _Cfg):
    B, _, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, bk = cfg.bwd
    q_BNTH, k_BKSH, v_BKSH, segs, Tp, Sp = _prep(q, k, v, seg, cfg, bq, bk)
    n_q, n_k = Tp // bq, Sp // bk
    do_BNTH = C.pad_axis(do.astype(q.dtype), 1, Tp).transpose(0, 2, 1, 3)
    delta_BNT1 = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))[..., None]
    args = (q_BNTH, k_BKSH, v_BKSH, do_BNTH, C.pad_axis(lse_BNT1, 2, Tp), C.pad_axis(delta_BNT1, 2, Tp), *segs)
    has_seg, prec = seg is not None, C.precision_for(q.dtype)
    params = pltpu.CompilerParams(dimension_semantics=_SEMANTICS)
    cost = C.cost_estimate(q, k, causal=cfg.causal, backward=True)

    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_q, n_k, cfg.causal, has_seg, k_inner=True)
    dq_BNTH = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, n_k=n_k, precision=prec),
        grid=(B, N, n_q, n_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        compiler_params=params,
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dq_tpu",
    )(*args)

    q_spec, kv_spec, row_spec, seg_specs = _specs(G, H, bq, bk, n_q, n_k, cfg.causal, has_seg, k_inner=False)
    dkv_dtype = jnp.float32 if G > 1 else k.dtype  # fp32 per-head partials keep the group sum exact
    out_spec = pl.BlockSpec((None, None, bk, H), lambda b, n, j, i: (b, n, j, 0))
    dk_BNSH, dv_BNSH = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg, n_q=n_q, precision=prec),
        grid=(B, N, n_k, n_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((B, N, Sp, H), dkv_dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        compiler_params=params,
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_dkdv_tpu",
    )(*args)

    def group_sum(x_BNSH):
        x_BSNH = x_BNSH[:, :, : cfg.S].transpose(0, 2, 1, 3)
        return x_BSNH.reshape(B, cfg.S, K, G, H).sum(3).astype(k.dtype)

    return dq_BNTH[:, :, : cfg.T].transpose(0, 2, 1, 3), group_sum(dk_BNSH), group_sum(dv_BNSH)


_flash = C.flash_custom_vjp(_forward, _backward)


def supports(q_shape, k_shape, dtype) -> tuple[bool, str]:
    H = q_shape[-1]
    if H > MAX_HEAD_DIM:
        return False, f"head_dim {H} > {MAX_HEAD_DIM}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False, f"dtype {jnp.dtype(dtype).name} not in float32/bfloat16"
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
    interpret: bool | None = None,
) -> jax.Array:
    """Causal/segmented GQA flash attention, BTNH in and out; fp32 accumulation, output in q's dtype."""
    C.validate("flash_tpu", supports, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    T, H, S = q_BTNH.shape[1], q_BTNH.shape[3], k_BSKH.shape[1]
    table = DEFAULT_BLOCKS[min(256, max(64, C.next_pow2(H)))]
    cfg = _Cfg(
        causal=causal,
        T=T,
        S=S,
        H=H,
        fwd=_blocks(block_q, block_k, table["fwd"], T, S),
        bwd=_blocks(block_q_bwd or block_q, block_k_bwd or block_k, table["bwd"], T, S),
        interpret=C.default_interpret(interpret),
    )
    return _flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg)
