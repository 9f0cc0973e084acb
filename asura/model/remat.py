"""Remat policies for the iteration loop, chosen by name (model.remat).

none       plain scan; autodiff keeps every iteration's activations.
block      jax.checkpoint around each block call (see looped.py): per block,
           only its input is kept and its insides are recomputed.
iteration  checkpoint the whole iteration body: only the carries (h_t and the
           running loss) are kept, one iteration is recomputed at a time.
sqrt       two-level (√S) checkpointing: an outer scan over ~√S chunks keeps
           only chunk-boundary carries; each chunk is a checkpointed inner scan
           whose steps are themselves checkpointed, so the backward pass holds
           ~2√S carries plus one iteration's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

POLICIES = ("none", "block", "iteration", "sqrt")


def check(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"model.remat={policy!r} is not valid; choose one of {', '.join(POLICIES)}")


def wrap_block(fn: Callable, policy: str) -> Callable:
    return jax.checkpoint(fn, prevent_cse=False) if policy == "block" else fn


def scan_iterations(body: Callable, carry, S: int, policy: str):
    """lax.scan of body(carry, t) over t = 0..S-1 under a remat policy.

    The sqrt policy pads the step count to chunks·chunk; the body must treat
    t >= S as a skipped step (it does: t >= S >= n).
    """
    check(policy)
    if policy == "sqrt" and S <= 2:  # too short to nest: √S chunks of one step is per-iteration remat
        policy = "iteration"
    if policy == "iteration":
        body = jax.checkpoint(body, prevent_cse=False)
    if policy != "sqrt":
        return jax.lax.scan(body, carry, jnp.arange(S))
    chunk = math.ceil(math.sqrt(S))
    n_chunks = math.ceil(S / chunk)
    inner = jax.checkpoint(body, prevent_cse=False)

    def outer(c, ts_C):
        return jax.lax.scan(inner, c, ts_C)

    outer = jax.checkpoint(outer, prevent_cse=False)
    carry, ys = jax.lax.scan(outer, carry, jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk))
    ys = jax.tree.map(lambda y: y.reshape(n_chunks * chunk, *y.shape[2:])[:S], ys)
    return carry, ys
