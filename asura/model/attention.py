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

from asura.parallel.logical import active_mesh

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


# ---------------------------------------------------------------------------------------------
# cuDNN and Pallas impls, capability checks and dispatch.

IMPL_CHOICES = ("auto", "xla", "cudnn", "pallas")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _backend() -> str:
    """Current platform: 'cpu', 'gpu' or 'tpu' (tests monkeypatch this)."""
    return jax.default_backend()


def _cudnn_max_head_dim() -> int:
    # cuDNN flash attention: head_dim <= 128, or <= 256 on Hopper (sm90+).
    try:
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        return 256 if float(cc) >= 9.0 else 128
    except (RuntimeError, ValueError, IndexError):
        return 128


def supports(
    impl: str,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dtype,
    *,
    backend: str | None = None,
    has_segment_ids: bool = False,
) -> tuple[bool, str]:
    """Whether `impl` can serve this call on `backend` (default: current), and why not."""
    backend = backend or _backend()
    H, dt = q_shape[-1], jnp.dtype(dtype)
    if impl == "xla":
        return True, "ok"
    if impl == "cudnn":
        if backend != "gpu":
            return False, f"cudnn needs a CUDA GPU backend, got {backend!r}"
        if dt not in _CUDNN_DTYPES:
            return False, f"cudnn needs bfloat16/float16 inputs, got {dt.name}"
        max_h = _cudnn_max_head_dim()
        if max_h < H or H % 8:
            return False, f"cudnn needs head_dim % 8 == 0 and <= {max_h} on this GPU, got {H}"
        if has_segment_ids:
            # jax.nn.dot_product_attention could only express segments as a dense [B,1,T,S] mask/bias,
            # which defeats flash attention's O(T) memory; refuse rather than silently materialise it.
            return False, "cudnn path does not support segment_ids (would need a dense T x S mask)"
        return True, "ok"
    if impl == "pallas":
        if backend in ("gpu", "cpu"):  # cpu: the Triton-style kernel in interpret mode
            from asura.kernels import flash_gpu

            return flash_gpu.supports(q_shape, k_shape, dt)
        if backend == "tpu":
            from asura.kernels import flash_tpu

            return flash_tpu.supports(q_shape, k_shape, dt)
        return False, f"no Pallas kernel for backend {backend!r}"
    return False, f"unknown attention impl {impl!r}; choose one of {', '.join(IMPL_CHOICES)}"


@register("cudnn")
def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, **_: object) -> jax.Array:
    """cuDNN fused attention via jax.nn.dot_product_attention (BTNH, GQA natively)."""
    if segment_ids_BT is not None:
        raise ValueError("cudnn attention does not support segment_ids; use impl='pallas' or 'xla'")
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal, implementation="cudnn")


@register("pallas")
def pallas_attention(
    q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, block_q: int = 0, block_k: int = 0, **_: object
) -> jax.Array:
    """GPU (Triton) kernel on gpu, TPU (Mosaic) kernel on tpu, interpret-mode GPU kernel on cpu."""
    backend = _backend()
    kw = dict(segment_ids_BT=segment_ids_BT, causal=causal, block_q=block_q or None, block_k=block_k or None)
    if backend == "tpu":
        from asura.kernels import flash_tpu

        return flash_tpu.flash_attention(q_BTNH, k_BSKH, v_BSKH, **kw, interpret=False)
    from asura.kernels import flash_gpu

    return flash_gpu.flash_attention(q_BTNH, k_BSKH, v_BSKH, **kw, interpret=backend == "cpu")


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
    name = resolve_impl(impl, q_BTNH, k_BSKH, segment_ids_BT=segment_ids_BT)
    return _IMPLS[name](
        q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT, causal=causal, block_q=block_q, block_k=block_k
    )


def resolve_impl(
    impl: str,
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    backend: str | None = None,
) -> str:
    """Concrete impl name. auto: Pallas on TPU/GPU where supported, then cuDNN on GPU, else XLA
    (always XLA on CPU, where the kernels would only run in slow interpret mode).
    An explicit impl that cannot serve the call raises ValueError with the reason."""
    backend = backend or _backend()
    args = (q_BTNH.shape, k_BSKH.shape, q_BTNH.dtype)
    kw = dict(backend=backend, has_segment_ids=segment_ids_BT is not None)
    if impl == "auto":
        order = {"tpu": ("pallas", "xla"), "gpu": ("pallas", "cudnn", "xla")}.get(backend, ("xla",))
        mesh = active_mesh()
        if mesh is not None and mesh.size > 1:
            # Our pallas_call has no partitioning rule yet, so GSPMD would gather its
            # inputs onto every device; XLA and cuDNN attention partition natively.
            order = tuple(name for name in order if name != "pallas")
        return next(name for name in order if supports(name, *args, **kw)[0])
    if impl not in IMPL_CHOICES or impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {', '.join(IMPL_CHOICES)}")
    ok, why = supports(impl, *args, **kw)
    if not ok:
        raise ValueError(
            f"attention impl {impl!r} cannot serve this call: {why}. Valid choices: "
            f"{', '.join(IMPL_CHOICES)} (auto picks a supported one)"
        )
    return impl
