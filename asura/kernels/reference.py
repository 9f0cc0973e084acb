"""Plain-JAX attention with the kernels' API: the oracle for kernel tests.

Same semantics as the `xla` impl in asura/model/attention.py (BTNH, GQA by head
grouping, causal top-left aligned, segment masking, rows with no visible key
give 0), but computed entirely in fp32 at HIGHEST matmul precision from upcast
inputs, so it is a tighter reference than the bf16-matmul xla path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from asura.kernels.common import check_inputs, scale_for


def attention_with_lse(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns (o_BTNH in fp32, lse_BNT in fp32; lse=-inf for rows with no visible key)."""
    check_inputs(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    hi = jax.lax.Precision.HIGHEST
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, G, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(jnp.float32), precision=hi) * scale_for(H)
    mask_BTS = jnp.ones((1, T, S), dtype=bool)
    if causal:
        mask_BTS = mask_BTS & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    mask_B11TS = mask_BTS[:, None, None]
    s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, -jnp.inf)
    lse_BKGT = jax.nn.logsumexp(s_BKGTS, axis=-1)
    safe_lse_BKGT = jnp.where(jnp.isfinite(lse_BKGT), lse_BKGT, 0.0)
    p_BKGTS = jnp.where(mask_B11TS, jnp.exp(s_BKGTS - safe_lse_BKGT[..., None]), 0.0)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH.astype(jnp.float32), precision=hi)
    return o_BTKGH.reshape(B, T, N, H), lse_BKGT.reshape(B, N, T)


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    **_: object,
) -> jax.Array:
    """Kernel-compatible signature (block sizes etc. accepted and ignored); output in q's dtype."""
    o_BTNH, _lse = attention_with_lse(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT, causal=causal)
    return o_BTNH.astype(q_BTNH.dtype)
