"""The core both flash-attention lowerings share: GPU (Triton, flash_gpu) and TPU (Mosaic, flash_tpu).

Data flow of one call, flash_gpu.flash_attention(q, k, v, ...) or flash_tpu's:

    flash_attention(backend, ...)   validate shapes, then backend.limits (max head dim, dtypes);
      |                             look up the backend's DEFAULT_BLOCKS row for H; resolve the
      |                             requested tiles under the backend's TileRule -> FlashConfig
    flash_custom_vjp(forward, backward)
      forward(q, k, v, seg, cfg)                       -> Forward(o, lse)     [backend kernels]
      backward(q, k, v, seg, lse, do, delta_BNT, cfg)  -> Grads(dq, dk, dv)   [backend kernels]
                                    delta = rowsum(dO*O) is computed here, once, for both

A backend file holds only what differs: its kernels, BlockSpecs and grid, padding and layout, compiler
params, and its facts as data (Limits, TileRule, DEFAULT_BLOCKS) gathered in a Backend.

The block math works on plain arrays (already loaded from refs), so the same online-softmax and
backward formulas run under both lowerings and in interpret mode. Invariants: scores are fp32, masked
scores are dropped with `where` (never by relying on exp(-big) underflow), so a query row that sees no
key gives 0 output and 0 gradients, matching the `xla` reference impl; FlashConfig is frozen and
hashable (it is the custom_vjp's static argument, so equal configs share one compiled program).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from asura.kernels.lowering import target_platform

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


def scale_for(H: int) -> float:
    return 1.0 / math.sqrt(H)


# ---- Backend facts as data -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    """Shapes and dtypes a kernel takes; `supports` reads only these, so a backend states them once."""

    max_head_dim: int
    dtypes: tuple[str, ...]
    why_head_dim: str = ""  # what breaks beyond max_head_dim, appended to the refusal

    def supports(self, q_shape, k_shape, dtype) -> tuple[bool, str]:
        head_dim = q_shape[-1]
        if head_dim > self.max_head_dim:
            why = f" ({self.why_head_dim})" if self.why_head_dim else ""
            return False, f"head_dim {head_dim} > {self.max_head_dim}{why}"
        if jnp.dtype(dtype).name not in self.dtypes:
            return False, f"dtype {jnp.dtype(dtype).name} not in {'/'.join(self.dtypes)}"
        return True, "ok"


@dataclasses.dataclass(frozen=True)
class TileRule:
    """Block sizes a lowering accepts: multiples of `align` that are at least `align`, powers of 2 if `pow2`."""

    align: int
    pow2: bool = False

    def describe(self) -> str:
        return f"powers of 2 >= {self.align}" if self.pow2 else f"multiples of {self.align}"

    def legal(self, block: int) -> bool:
        return block >= self.align and block % self.align == 0 and not (self.pow2 and block & (block - 1))

    def cover(self, n: int) -> int:
        """Smallest legal tile holding n rows: a short sequence shrinks its tile rather than pad up to it."""
        n = round_up(n, self.align)
        return next_pow2(n) if self.pow2 else n


class Tiles(NamedTuple):
    """One pass's tiles, plus the backend's launch knobs from its table row (GPU: num_warps, num_stages)."""

    block_q: int
    block_k: int
    launch: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static kernel configuration (the custom_vjp's nondiff argument)."""

    causal: bool
    T: int
    S: int
    H: int  # true head dim (sets the 1/sqrt(H) scale), whatever a backend pads it to
    fwd: Tiles
    bwd: Tiles
    interpret: Any  # bool, or pltpu.InterpretParams for the TPU simulator

    @property
    def scale(self) -> float:
        return scale_for(self.H)

    def kv_len(self, block_k: int) -> int | None:
        """Unpadded key length when keys are padded to whole k blocks (so kernels must mask it), else None."""
        return self.S if round_up(self.S, block_k) != self.S else None

    def mask(self, tiles: Tiles, i, j, q_seg_Q1=None, k_seg_1K=None) -> jax.Array | None:
        """block_mask of tile (q block i, k block j) of the pass that uses `tiles`."""
        bq, bk = tiles.block_q, tiles.block_k
        kv_len = self.kv_len(bk)
        return block_mask(
            i * bq, j * bk, bq, bk, causal=self.causal, kv_len=kv_len, q_seg_Q1=q_seg_Q1, k_seg_1K=k_seg_1K
        )


class Forward(NamedTuple):
    o_BTNH: jax.Array
    lse: jax.Array  # natural-log logsumexp per query row, in the backend's own layout (only it reads it)


class Grads(NamedTuple):
    dq_BTNH: jax.Array
    dk_BSKH: jax.Array
    dv_BSKH: jax.Array


@dataclasses.dataclass(frozen=True)
class Backend:
    """One lowering as the shared entry sees it: its name, facts, and custom_vjp-wrapped kernels."""

    name: str  # prefixes entry errors, e.g. "flash_gpu: head_dim 512 > 256"
    limits: Limits
    default_blocks: Mapping[int, Mapping[str, tuple[int, ...]]]  # head-dim bucket -> {"fwd"|"bwd": row}
    tiles: TileRule
    flash: Callable  # flash_custom_vjp(forward, backward)


def default_row(table: Mapping[int, Mapping[str, tuple[int, ...]]], H: int) -> Mapping[str, tuple[int, ...]]:
    """The table row for head dim H: the smallest bucket >= H rounded up to a power of 2, else the largest."""
    h = next_pow2(H)
    return table[min((bucket for bucket in table if bucket >= h), default=max(table))]


def resolve_tiles(
    backend: Backend, row: tuple[int, ...], block_q: int | None, block_k: int | None, T: int, S: int, launch=()
) -> Tiles:
    """Requested blocks (or the row's), checked against the backend's TileRule and shrunk to cover T and S.

    row is (block_q, block_k, *launch knobs); launch holds one override (or None) per knob, or is empty.
    """
    bq, bk = block_q or row[0], block_k or row[1]
    rule = backend.tiles
    if not (rule.legal(bq) and rule.legal(bk)):
        raise ValueError(f"{backend.name}: blocks must be {rule.describe()}, got block_q={bq} block_k={bk}")
    overrides = tuple(launch) or (None,) * len(row[2:])  # () = keep every knob of the row
    knobs = tuple(given or default for given, default in zip(overrides, row[2:], strict=True))
    return Tiles(min(bq, rule.cover(T)), min(bk, rule.cover(S)), knobs)


class FlashOptions(TypedDict, total=False):
    """Keyword options every backend's flash_attention takes; defaults as in `flash_attention` below."""

    segment_ids_BT: jax.Array | None
    causal: bool
    block_q: int | None
    block_k: int | None
    block_q_bwd: int | None  # backward tiles; default to block_q/block_k, then to the table's bwd row
    block_k_bwd: int | None
    interpret: Any  # None: interpret exactly when lowering for a CPU


def flash_attention(
    backend: Backend,
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
    interpret: Any = None,
    launch: Sequence[int | None] = (),
) -> jax.Array:
    """Causal/segmented GQA flash attention on `backend`, BTNH in and out; fp32 accumulation, q's dtype out."""
    validate(backend.name, backend.limits.supports, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    T, H, S = q_BTNH.shape[1], q_BTNH.shape[3], k_BSKH.shape[1]
    row = default_row(backend.default_blocks, H)
    cfg = FlashConfig(
        causal=causal,
        T=T,
        S=S,
        H=H,
        fwd=resolve_tiles(backend, row["fwd"], block_q, block_k, T, S, launch),
        bwd=resolve_tiles(backend, row["bwd"], block_q_bwd or block_q, block_k_bwd or block_k, T, S, launch),
        interpret=default_interpret(interpret),
    )
    return backend.flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg)


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


def flash_custom_vjp(forward: Callable, backward: Callable) -> Callable:
    """Wrap a kernel pair in a custom_vjp: f(q, k, v, seg, cfg) -> o, saving (q, k, v, seg, o, lse).

    forward(q, k, v, seg, cfg) -> Forward; backward(q, k, v, seg, lse, do, delta_BNT, cfg) -> Grads.
    Both lowerings share this, so the residuals and the vjp plumbing cannot drift apart. The
    returned f casts v to q's dtype and segment ids (or None) to int32 before the kernels see them.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash(q, k, v, seg, cfg):
        return forward(q, k, v, seg, cfg).o_BTNH

    def flash_fwd(q, k, v, seg, cfg):
        o, lse = forward(q, k, v, seg, cfg)
        return o, (q, k, v, seg, o, lse)

    def flash_bwd(cfg, res, do):
        q, k, v, seg, o, lse = res
        grads = backward(q, k, v, seg, lse, do.astype(q.dtype), row_delta(o, do), cfg)
        return (*grads, None)  # no cotangent for segment ids

    flash.defvjp(flash_fwd, flash_bwd)

    def call(q, k, v, seg, cfg):
        return flash(q, k, v.astype(q.dtype), None if seg is None else seg.astype(jnp.int32), cfg)

    return call


# ---- Array plumbing around the kernels -----------------------------------------------------------


def row_delta(o_BTNH: jax.Array, do_BTNH: jax.Array) -> jax.Array:
    """delta_BNT = rowsum(dO * O) in fp32: the softmax-gradient term dS = P * (dP - delta) subtracts."""
    return jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), o_BTNH.astype(jnp.float32))


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_segments(segment_ids_BT: jax.Array | None, Tp: int, Sp: int) -> list[jax.Array]:
    """[q-side ids padded to Tp, kv-side ids padded to Sp], or [] without ids (so `*segs` adds no inputs).

    Padded positions get id 0; that is harmless because padded keys are masked by kv_len and padded
    query rows are sliced away.
    """
    if segment_ids_BT is None:
        return []
    return [pad_axis(segment_ids_BT, 1, Tp), pad_axis(segment_ids_BT, 1, Sp)]


class KernelRefs(NamedTuple):
    ins: tuple  # array inputs, in call order
    segs: tuple  # (q_seg_ref, k_seg_ref), or (None, None) without segment ids
    outs: tuple  # outputs, then scratch


def split_refs(refs: Sequence, n_in: int, has_seg: bool) -> KernelRefs:
    """Pallas hands a kernel one flat list; segment-id refs, when passed, follow the n_in array inputs."""
    n_seg = 2 if has_seg else 0
    segs = tuple(refs[n_in : n_in + n_seg]) if has_seg else (None, None)
    return KernelRefs(tuple(refs[:n_in]), segs, tuple(refs[n_in + n_seg :]))


def partials_dtype(G: int, dtype) -> jnp.dtype:
    """dtype of per-query-head dk/dv partials: fp32 when G > 1 heads are summed, so the sum rounds once."""
    return jnp.dtype(jnp.float32) if G > 1 else jnp.dtype(dtype)


def group_sum(x_BSNH: jax.Array, K: int, dtype) -> jax.Array:
    """Per-query-head dk or dv (unpadded) summed over each kv head's G = N // K query heads (GQA)."""
    B, S, N, H = x_BSNH.shape
    return x_BSNH.reshape(B, S, K, N // K, H).sum(3).astype(dtype)


def causal_k_end(i, block_q: int, block_k: int, n_k: int):
    """Causal (top-left aligned): how many k blocks q block i sees; its last query row is (i+1)*block_q - 1."""
    return jnp.minimum(lax.div((i + 1) * block_q + block_k - 1, block_k), n_k)


def first_q_block(j, block_q: int, block_k: int):
    """Causal: the first q block that sees k block j holds query j*block_k."""
    return lax.div(j * block_k, block_q)


# ---- Block math on loaded tiles ------------------------------------------------------------------


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


class SoftmaxState(NamedTuple):
    """Running online-softmax statistics of one q tile: max, normaliser, unnormalised output (fp32)."""

    m_Q1: jax.Array
    l_Q1: jax.Array
    acc_QH: jax.Array

    @classmethod
    def start(cls, block_q: int, H: int) -> SoftmaxState:
        return cls(
            jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, H), jnp.float32),
        )


def online_softmax_step(s_QK, v_KH, mask_QK, state: SoftmaxState, precision) -> SoftmaxState:
    """One flash-attention-2 update with scaled fp32 scores s_QK."""
    m_Q1, l_Q1, acc_QH = state
    if mask_QK is not None:
        s_QK = jnp.where(mask_QK, s_QK, MASK_VALUE)
    m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
    p_QK = jnp.exp(s_QK - m_new_Q1)
    if mask_QK is not None:
        p_QK = jnp.where(mask_QK, p_QK, 0.0)
    l_new_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
    acc_QH = alpha_Q1 * acc_QH + dot(p_QK.astype(v_KH.dtype), v_KH, NN, precision)
    return SoftmaxState(m_new_Q1, l_new_Q1, acc_QH)


def finalize(state: SoftmaxState):
    """Output (fp32) and natural-log logsumexp; rows with no visible key give o=0, lse=MASK_VALUE."""
    m_Q1, l_Q1, acc_QH = state
    visible_Q1 = l_Q1 > 0.0
    safe_l_Q1 = jnp.where(visible_Q1, l_Q1, 1.0)
    o_QH = acc_QH / safe_l_Q1
    lse_Q1 = jnp.where(visible_Q1, m_Q1 + jnp.log(safe_l_Q1), MASK_VALUE)
    return o_QH, lse_Q1


class BlockGrads(NamedTuple):
    p_QK: jax.Array  # recomputed probabilities (dv += p.T @ dO)
    ds_QK: jax.Array  # unscaled score gradients (dq += ds @ k, dk += ds.T @ q)


def recompute_p_ds(q_QH, k_KH, v_KH, do_QH, lse_Q1, delta_Q1, mask_QK, scale: float, precision) -> BlockGrads:
    """Backward block: p from the saved logsumexp, and dS = p * (dP - delta), fp32."""
    s_QK = dot(q_QH, k_KH, NT, precision) * scale
    dp_QK = dot(do_QH, v_KH, NT, precision)
    p_QK = jnp.exp(s_QK - lse_Q1)
    if mask_QK is not None:
        p_QK = jnp.where(mask_QK, p_QK, 0.0)
    ds_QK = p_QK * (dp_QK - delta_Q1)
    return BlockGrads(p_QK, ds_QK)


# ---- Cost model ------------------------------------------------------------------------------------


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
