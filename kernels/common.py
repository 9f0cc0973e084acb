"""Block math shared by the GPU (Triton) and TPU (Mosaic) flash-attention kernels.

Everything here works on plain arrays (already loaded from refs), so the same
online-softmax and backward formulas run under both lowerings and in interpret
mode. Conventions: scores are fp32, masked scores are dropped with `where`
(never by relying on exp(-big) underflow), so a query row that sees no key gives
0 output and 0 gradients, matching the `xla` reference impl.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from asura.kernels.lowering import target_platform
from jax import lax
from jax.experimental import pallas as pl

# Finite stand-in for -inf in the running max: exp(m_prev - m_new) never sees inf - inf.
MASK_VALUE = -1e30

NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def default_interpret(interpret: bool | None) -> bool:
    # Interpret only when the chip we lower for is a CPU: under kernels.lowering.target("h100")
    # the real Triton/Mosaic lowering runs even though the host is a CPU.
    return target_platform() == "cpu" if interpret is None else interpret


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def dot(a: jax.Array, b: jax.Array, dims, precision) -> jax.Array:
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def precision_for(dtype) -> lax.Precision | None:
    # fp32 inputs: ask for full fp32 matmuls (Triton otherwise picks TF32, ~3e-4 rel error).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def block_mask(
    q_start,
    k_start,
    block_q: int,
    block_k: int,
    *,
    causal: bool,
    kv_len: int | None,
    q_seg_Q1: jax.Array | None = None,
    k_seg_1K: jax.Array | None = None,
) -> jax.Array | None:
    """[block_q, block_k] visibility; None when every pair is visible.

    kv_len is the unpadded key length, or None when no key padding exists. Segment
    ids come pre-shaped [Q,1] and [1,K] so each lowering can load them its own way.
    """
    mask = None

    def _and(a, b):
        return b if a is None else a & b

    if causal or kv_len is not None:
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        if kv_len is not None:
            mask = _and(mask, k_pos < kv_len)
        if causal:
            q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
            mask = _and(mask, q_pos >= k_pos)
    if q_seg_Q1 is not None:
        mask = _and(mask, q_seg_Q1 == k_seg_1K)
    return mask


def online_softmax_step(s_QK, v_KH, mask_QK, m_Q1, l_Q1, acc_QH, precision):
    """One flash-attention-2 update with scaled fp32 scores s_QK. Returns (m, l, acc)."""
    if mask_QK is not None:
        s_QK = jnp.where(mask_QK, s_QK, MASK_VALUE)
    m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
    p_QK = jnp.exp(s_QK - m_new_Q1)
    if mask_QK is not None:
        p_QK = jnp.where(mask_QK, p_QK, 0.0)
    l_new_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
    acc_QH = alpha_Q1 * acc_QH + dot(p_QK.astype(v_KH.dtype), v_KH, NN, precision)
    return m_new_Q1, l_new_Q1, acc_QH


def finalize(m_Q1, l_Q1, acc_QH):
    """Output (fp32) and natural-log logsumexp; rows with no visible key give o=0, lse=MASK_VALUE."""
    visible_Q1 = l_Q1 > 0.0
    safe_l_Q1 = jnp.where(visible_Q1, l_Q1, 1.0)
    o_QH = acc_QH / safe_l_Q1
    lse_Q1 = jnp.where(visible_Q1, m_Q1 + jnp.log(safe_l_Q1), MASK_VALUE)
    return o_QH, lse_Q1


def recompute_p_ds(s_QK, dp_QK, lse_Q1, delta_Q1, mask_QK):
    """Backward block: probabilities p and dS = p * (dP - delta) (unscaled), fp32."""
    p_QK = jnp.exp(s_QK - lse_Q1)
    if mask_QK is not None:
        p_QK = jnp.where(mask_QK, p_QK, 0.0)
    ds_QK = p_QK * (dp_QK - delta_Q1)
    return p_QK, ds_QK


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attention_flops(B: int, T: int, S: int, N: int, H: int, causal: bool) -> int:
    """Matmul flops of the forward pass: 2 matmuls x 2 flops/MAC, halved when causal."""
    f = 4 * B * N * T * S * H
    return f // 2 if causal else f


def cost_estimate(q_BTNH, k_BSKH, *, causal: bool, backward: bool = False) -> pl.CostEstimate:
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    isz = jnp.dtype(q_BTNH.dtype).itemsize
    fwd = attention_flops(B, T, S, N, H, causal)
    exps = B * N * T * S // (2 if causal else 1)
    q_bytes = B * T * N * H * isz
    kv_bytes = 2 * B * S * K * H * isz
    if backward:
        # 5 matmuls (recompute s, dp, dv, dk, dq) vs 2 forward: 2.5x; reads q,k,v,o,do + lse/delta, writes dq,dk,dv.
        return pl.CostEstimate(
            flops=int(fwd * 5 // 2),
            transcendentals=int(exps),
            bytes_accessed=int(3 * q_bytes + 2 * kv_bytes + 8 * B * N * T),
        )
    return pl.CostEstimate(flops=int(fwd), transcendentals=int(exps), bytes_accessed=int(2 * q_bytes + kv_bytes))


def check_inputs(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT) -> None:
    B, T, N, H = q_BTNH.shape
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"k/v shapes {k_BSKH.shape}/{v_BSKH.shape} incompatible with q {q_BTNH.shape}")
    if N % k_BSKH.shape[2]:
        raise ValueError(f"query heads {N} not a multiple of kv heads {k_BSKH.shape[2]}")
    if segment_ids_BT is not None and (segment_ids_BT.shape != (B, T) or k_BSKH.shape[1] != T):
        raise ValueError(f"segment_ids {segment_ids_BT.shape} need shape (B, T)={B, T} and S == T")


def validate(kernel: str, supports: Callable, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT) -> None:
    """Entry checks every kernel makes: compatible shapes, then the kernel's own limits (ValueError)."""
    check_inputs(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    ok, why = supports(q_BTNH.shape, k_BSKH.shape, q_BTNH.dtype)
    if not ok:
        raise ValueError(f"{kernel}: {why}")


def scale_for(H: int) -> float:
    return 1.0 / math.sqrt(H)


def flash_custom_vjp(forward: Callable, backward: Callable) -> Callable:
    """Wrap a kernel pair in a custom_vjp: f(q, k, v, seg, cfg) -> o, saving (q, k, v, seg, o, lse).

    forward(q, k, v, seg, cfg) -> (o, lse); backward(q, k, v, seg, o, lse, do, cfg) -> (dq, dk, dv).
    Both lowerings share this, so the residuals and the vjp plumbing cannot drift apart. The
    returned f casts v to q's dtype and segment ids (or None) to int32 before the kernels see them.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash(q, k, v, seg, cfg):
        return forward(q, k, v, seg, cfg)[0]

    def flash_fwd(q, k, v, seg, cfg):
        o, lse = forward(q, k, v, seg, cfg)
        return o, (q, k, v, seg, o, lse)

    def flash_bwd(cfg, res, do):
        q, k, v, seg, o, lse = res
        return (*backward(q, k, v, seg, o, lse, do, cfg), None)  # no cotangent for segment ids

    flash.defvjp(flash_fwd, flash_bwd)

    def call(q, k, v, seg, cfg):
        return flash(q, k, v.astype(q.dtype), None if seg is None else seg.astype(jnp.int32), cfg)

    return call
