"""One attention entry point with a registry of implementations.

Layout is BTNH (batch, time, heads, head_dim), the layout cuDNN and our Pallas
kernels use. Keys/values may have fewer heads than queries (GQA). Masks are
never materialised by callers: pass `causal` and optional `segment_ids_BT`
(packed documents; tokens attend only within their own segment).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from asura.kernels.lowering import target_platform
from asura.model.activations import masked_softmax
from asura.parallel.logical import active_mesh, logical_to_spec
from asura.registry import Registry

AttentionFn = Callable[..., jax.Array]
Supports = Callable[..., tuple[bool, str]]  # (q_shape, k_shape, dtype, backend, has_segment_ids) -> (ok, why)


@dataclass(frozen=True)
class AttentionImpl:
    """One implementation: how to call it and when it can serve a call (its own `supports`)."""

    doc: str
    call: AttentionFn | None  # None for "auto", which resolves to another entry per call
    supports: Supports


IMPLS: Registry[AttentionImpl] = Registry("model.attention", "which attention implementation the model calls")


def available() -> tuple[str, ...]:
    """Concrete implementations (every registry entry but auto)."""
    return tuple(sorted(name for name, impl in IMPLS.items() if impl.call is not None))


def xla_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None = None,
    causal: bool = True,
    **_: object,
) -> jax.Array:
    """Plain-JAX reference: fp32 softmax, GQA by head grouping, segment masking.

    Heads move ahead of time before the matmuls (q as [B, K, G·T, H]): both score matmuls and
    their gradients are then plain batched matmuls over (B, K), and XLA:CPU needs no transpose
    of the [T, S] scores (in BTNH order it copied them 4 times per call: bench/op_profile.py).
    Only the small q/k/v/o tensors are transposed."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BSKH.shape[2], k_BSKH.shape[1]
    G = N // K
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # R = (g, t)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    s_BKRS = jnp.einsum("bkrh,bksh->bkrs", q_BKRH, k_BKSH, preferred_element_type=jnp.float32)
    s_BKGTS = s_BKRS.reshape(B, K, G, T, S) * (1.0 / jnp.sqrt(jnp.float32(H)))
    mask_BTS = jnp.ones((1, T, S), dtype=bool)
    if causal:
        mask_BTS = mask_BTS & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    # Rows with no visible key (impossible with causal self-attention) give zeros, not NaN. The
    # backward keeps only p (asura.model.activations).
    p_BKRS = masked_softmax(s_BKGTS, mask_BTS[:, None, None]).reshape(B, K, G * T, S)
    o_BKRH = jnp.einsum("bkrs,bksh->bkrh", p_BKRS.astype(v_BSKH.dtype), v_BKSH, preferred_element_type=jnp.float32)
    o_BTNH = o_BKRH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    return o_BTNH.astype(q_BTNH.dtype)


_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _backend() -> str:
    """Platform lowered for: 'cpu', 'gpu' or 'tpu' (an AOT target's, else the host's; tests monkeypatch this)."""
    return target_platform()


def _cudnn_max_head_dim() -> int:
    # cuDNN flash attention: head_dim <= 128, or <= 256 on Hopper (sm90+).
    try:
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        return 256 if float(cc) >= 9.0 else 128
    except (RuntimeError, ValueError, IndexError):
        return 128


def _xla_supports(q_shape, k_shape, dtype, backend, has_segment_ids) -> tuple[bool, str]:
    return True, "ok"


def _cudnn_supports(q_shape, k_shape, dtype, backend, has_segment_ids) -> tuple[bool, str]:
    H, dt = q_shape[-1], jnp.dtype(dtype)
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


def _pallas_supports(q_shape, k_shape, dtype, backend, has_segment_ids) -> tuple[bool, str]:
    if backend in ("gpu", "cpu"):  # cpu: the Triton-style kernel in interpret mode
        from asura.kernels import flash_gpu as kernel
    elif backend == "tpu":
        from asura.kernels import flash_tpu as kernel
    else:
        return False, f"no Pallas kernel for backend {backend!r}"
    ok, why = kernel.supports(q_shape, k_shape, jnp.dtype(dtype))
    if ok:
        ok, why = shard_specs(q_shape, k_shape)[:2]
    return ok, why


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
    if impl not in IMPLS or IMPLS[impl].call is None:
        return False, f"unknown attention impl {impl!r}; choose one of {', '.join(available())}"
    return IMPLS[impl].supports(q_shape, k_shape, dtype, backend or _backend(), has_segment_ids)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, **_: object) -> jax.Array:
    """cuDNN fused attention via jax.nn.dot_product_attention (BTNH, GQA natively)."""
    if segment_ids_BT is not None:
        raise ValueError("cudnn attention does not support segment_ids; use impl='pallas' or 'xla'")
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal, implementation="cudnn")


def shard_specs(q_shape, k_shape) -> tuple[bool, str, tuple[P, P, P] | None]:
    """(ok, why, (q, kv, segment-id) PartitionSpecs) for running a kernel per shard of the active mesh.

    Specs are None without a multi-device mesh. A pallas_call has no partitioning rule, so under a
    mesh it runs inside shard_map on each device's batch rows and heads; that needs the sequence and
    head_dim unsharded (no context parallelism), the same mesh axes on query and kv heads (so GQA
    groups stay on one device), and every sharded dim divisible by its mesh axes.
    """
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return True, "ok", None
    q_spec = logical_to_spec(("batch", "seq", "heads", "head_dim"))
    kv_spec = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"))
    if any(spec[i] is not None for spec in (q_spec, kv_spec) for i in (1, 3)):
        return False, f"Pallas attention needs seq and head_dim unsharded under a mesh, rules give q {q_spec}", None
    if q_spec[2] != kv_spec[2]:
        return False, f"Pallas attention needs heads and kv_heads on one mesh axis set: {q_spec} vs {kv_spec}", None

    def n_shards(entry) -> int:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        return int(np.prod([mesh.shape[a] for a in axes]))

    (B, _, N, _), K = q_shape, k_shape[2]
    for what, size, entry in (("batch", B, q_spec[0]), ("query heads", N, q_spec[2]), ("kv heads", K, q_spec[2])):
        if size % n_shards(entry):
            return False, f"{what} {size} not divisible by the {n_shards(entry)} shards of mesh axes {entry}", None
    return True, "ok", (q_spec, kv_spec, P(q_spec[0], None))


def pallas_attention(
    q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, block_q: int = 0, block_k: int = 0, **_: object
) -> jax.Array:
    """GPU (Triton) kernel on gpu, TPU (Mosaic) kernel on tpu, interpret-mode GPU kernel on cpu;
    per shard (shard_map over batch and heads) under a multi-device mesh."""
    backend = _backend()
    if backend == "tpu":
        from asura.kernels import flash_tpu

        kernel = functools.partial(flash_tpu.flash_attention, interpret=False)
    else:
        from asura.kernels import flash_gpu

        kernel = functools.partial(flash_gpu.flash_attention, interpret=backend == "cpu")
    kernel = functools.partial(kernel, causal=causal, block_q=block_q or None, block_k=block_k or None)
    ok, why, specs = shard_specs(q_BTNH.shape, k_BSKH.shape)
    if not ok:
        raise ValueError(f"pallas attention: {why}")
    if specs is None:
        return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT)
    q_spec, kv_spec, seg_spec = specs
    seg = () if segment_ids_BT is None else (segment_ids_BT,)

    def local(q, k, v, *seg):
        return kernel(q, k, v, segment_ids_BT=seg[0] if seg else None)

    # check_vma off: the kernel is purely per-shard (no collectives), and pallas_call's
    # varying-axes typing differs across the jax versions we support.
    return jax.shard_map(
        local, mesh=active_mesh(), in_specs=(q_spec, kv_spec, kv_spec, *[seg_spec] * len(seg)), out_specs=q_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, *seg)  # fmt: skip


IMPLS.add(
    "auto", AttentionImpl("per backend: Pallas on TPU, Pallas then cuDNN on GPU, XLA on CPU", None, _xla_supports)
)
IMPLS.add("xla", AttentionImpl("plain JAX reference: fp32 softmax, any backend", xla_attention, _xla_supports))
IMPLS.add("cudnn", AttentionImpl("cuDNN fused attention (GPU, bf16/fp16)", cudnn_attention, _cudnn_supports))
IMPLS.add("pallas", AttentionImpl("our Pallas flash kernels (asura/kernels/)", pallas_attention, _pallas_supports))


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
    return IMPLS[name].call(
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
        return next(name for name in order if supports(name, *args, **kw)[0])
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {', '.join(IMPLS)}")
    ok, why = supports(impl, *args, **kw)
    if not ok:
        raise ValueError(
            f"attention impl {impl!r} cannot serve this call: {why}. Valid choices: "
            f"{', '.join(IMPLS)} (auto picks a supported one)"
        )
    return impl
