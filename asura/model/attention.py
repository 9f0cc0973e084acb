"""One attention entry point with a registry of implementations.

Layout is BTNH (batch, time, heads, head_dim), the layout cuDNN and our Pallas
kernels use. Keys/values may have fewer heads than queries (GQA). Masks are
never materialised by callers: pass `causal` and optional `segment_ids_BT`
(packed documents; tokens attend only within their own segment).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_IMPLS: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def deco(fn: AttentionFn) -> AttentionFn:
        _IMPLS[name] = fn
        return fn

    return deco


def available() -> tuple[str, ...]:
    return tuple(sorted(_IMPLS))


@register("xla")
def xla_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    **_: object,
) -> jax.Array:
    """Plain-JAX reference: fp32 softmax, GQA by head grouping, segment masking."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    s_BKGTS = s_BKGTS * (1.0 / jnp.sqrt(jnp.float32(H)))
    S = k_BSKH.shape[1]
    mask_BTS = jnp.ones((1, T, S), dtype=bool)
    if causal:
        mask_BTS = mask_BTS & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -1e30)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    # Rows with no visible key (impossible with causal self-attention) give zeros, not NaN.
    p_BKGTS = jnp.where(mask_BTS[:, None, None], p_BKGTS, 0.0)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    impl: str = "auto",
    block_q: int = 0,
    block_k: int = 0,
) -> jax.Array:
    """Dispatch to an implementation. `auto` resolves per backend and shape."""
    name = resolve_impl(impl, q_BTNH, k_BSKH)
    return _IMPLS[name](
        q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT, causal=causal, block_q=block_q, block_k=block_k
    )


def resolve_impl(impl: str, q_BTNH: jax.Array, k_BSKH: jax.Array) -> str:
    if impl == "auto":
        return "xla"
    if impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of auto, {', '.join(available())}")
    return impl
