"""What flows through the depth loop (asura.model.looped): the carry, the per-step outputs,
the named result, the scoring object, and the two traceable helpers the drivers share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asura.model.loss import Score


class LoopCarry(NamedTuple):
    h_BTD: jax.Array  # latent after the last step run
    objective: jax.Array  # Σ_t w_t · (ce_t + z · lse²_t) so far (0 without scoring)
    z_term: jax.Array  # Σ_t w_t · z · lse²_t so far
    state: Any = ()  # per-token state: asura.model.halting.Halt under halting, else ()


class LoopResult(NamedTuple):
    h_BTD: jax.Array  # final iteration's latent h_{n-1}
    objective: jax.Array
    z_term: jax.Array
    ce_S: jax.Array | None  # per-step CE with scoring (0 for t >= n), else None
    acc_S: jax.Array | None
    h_SBTD: jax.Array | None  # per-step latents with keep_latents (h_{n-1} repeated for t >= n)
    S: int  # static loop length
    n: jax.Array  # depth as a traced int32, clipped to [1, S] (outputs are NaN when n was outside)
    depth_BT: jax.Array | None = None  # under halting: iterations each token ran (its exit depth)
    state: Any = None  # the final LoopCarry.state (halting.Halt under halting, GateState under the gate's loss)


@dataclass(frozen=True)
class Scoring:
    """Latent guidance inside the loop: step t adds w_S[t] · (ce_t + z_loss · lse²_t)."""

    score: Callable[[jax.Array], Score]  # h_BTD -> Score(ce, z, acc), masked token means
    w_S: jax.Array  # per-step weights, zero for t >= n
    z_loss: float


@dataclass(frozen=True)
class GateScoring:
    """The exit gate's loss inside the loop (model.exit_gate). expected: step t adds the masked token
    mean of p_t · (ce_t + z_loss · lse²_t), p_t each token's probability of exiting after iteration t.
    improvement (k, γ): step t > 0 adds the binary cross-entropy of λ_{t-1} against the label
    σ(k·(max(0, ce_{t-1} − ce_t) − γ)) that continuing was right, over n − 1 (Ouro's stage II)."""

    tokens: Callable[[jax.Array], Score]  # h_BTD -> per-token Score(ce_BT, lse²_BT, correct_BT)
    mask_BT: jax.Array
    n: jax.Array  # the traced depth: the last iteration takes the remaining survival
    z_loss: float
    improvement: tuple[float, float] | None = None  # (k, γ) for model.exit_gate_loss=improvement


class GateState(NamedTuple):
    """LoopCarry.state under GateScoring."""

    survival_BT: jax.Array  # Π_{j<t}(1 − λ_j): the token has not exited before iteration t
    entropy: jax.Array  # Σ_t masked mean of −p_t·log p_t so far
    depth: jax.Array  # Σ_t masked mean of (t + 1)·p_t so far: the expected exit depth
    ce_BT: jax.Array  # the improvement loss: the previous iteration's per-token CE (no gradient)
    logit_BT: jax.Array  # ... and the gate's logit there, whose decision this iteration labels


class HaltGate(NamedTuple):
    """LoopCarry.state under halting with the gate's loss (depth.halt_gate_loss): both at once."""

    halt: Any  # asura.model.halting.Halt
    gate: GateState


class Iterated(NamedTuple):
    """One loop step through `LoopedLM.iteration_cached` (asura.infer's KV cache)."""

    h_BTD: jax.Array
    k_LBTKH: tuple[jax.Array, ...]  # per layer: this step's keys (after qk-norm and RoPE) and values
    v_LBTKH: tuple[jax.Array, ...]


class StepOut(NamedTuple):
    h_BTD: jax.Array | None
    ce: jax.Array | None
    acc: jax.Array | None


def projconcat_init(std: float):
    """W_proj[t] = ½[I; I] + N(0, std²): u_t starts as the mean of e and h_{t-1},
    so the loop starts close to additive injection instead of a random mix."""

    def init(key, shape, dtype):
        d = shape[-1]
        half_eye = 0.5 * jnp.concatenate([jnp.eye(d), jnp.eye(d)], axis=0)
        return (half_eye + std * jax.random.normal(key, shape)).astype(dtype)

    return init


def default_positions(segment_ids_BT: jax.Array | None, B: int, T: int) -> jax.Array:
    """0..T-1, restarting at every packed document boundary when segment ids are given."""
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
        return t_BT
    start_BT = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return t_BT - jax.lax.cummax(jnp.where(start_BT, t_BT, 0), axis=1)


def frozen(t, n, bptt_k):
    """True where step t runs under stop_gradient: t < n − k (k > 0). Traceable."""
    return (bptt_k > 0) & (t < n - bptt_k)


def concrete_depth(n) -> int | None:
    """n as a Python int when it is known now (int, numpy or concrete jax scalar); None when traced."""
    if isinstance(n, int | np.integer):
        return int(n)
    if isinstance(n, jax.core.Tracer):
        return None
    if isinstance(n, jax.Array | np.ndarray) and np.ndim(n) == 0:
        return int(n)
    raise TypeError(f"depth n must be an integer scalar, got {type(n).__name__} {getattr(n, 'shape', '')}")


def depth_index(n, S: int) -> tuple[jax.Array, jax.Array | None]:
    """(n clipped to 1..S as int32, validity) for indexing; validity is None when n is concrete
    (scan_len has already checked it), else a traced bool that is False outside 1..S."""
    n_arr = jnp.asarray(n, jnp.int32)
    valid = None if concrete_depth(n) is not None else (n_arr >= 1) & (n_arr <= S)
    return jnp.clip(n_arr, 1, S), valid


def poison(x, valid):
    """x where valid, else NaN (floating arrays); None and non-float arrays pass through."""
    if x is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return jnp.where(valid, x, jnp.asarray(jnp.nan, x.dtype))
