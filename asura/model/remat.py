"""Remat policies for the iteration loop, chosen by name (model.remat).

Each registry entry says what the backward pass keeps, how the scan driver scans the loop
(model.loop=scan), and what the while driver stores per executed step (``store``, see
asura.model.dynamic_loop; model.loop=while, the default):

none       plain scan; autodiff keeps every iteration's activations.
block      jax.checkpoint around each block call: per block, only its input is kept and
           its insides are recomputed.
iteration  checkpoint the whole iteration body: only the carries (h_t and the running
           loss) are kept, one iteration is recomputed at a time.
sqrt       two-level (√S) checkpointing: an outer scan over ~√S chunks keeps only
           chunk-boundary carries; each chunk is a checkpointed inner scan whose steps are
           themselves checkpointed, so the backward pass holds ~2√S carries plus one
           iteration's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from asura.registry import Registry

Scan = Callable[[Callable, object, int], tuple]  # (body(carry, t), carry, S) -> (carry, ys)


def _checkpoint(fn: Callable) -> Callable:
    return jax.checkpoint(fn, prevent_cse=False)


def _plain_scan(body, carry, S: int):
    return jax.lax.scan(body, carry, jnp.arange(S))


def _iteration_scan(body, carry, S: int):
    return jax.lax.scan(_checkpoint(body), carry, jnp.arange(S))


def sqrt_chunks(S: int) -> tuple[int, int]:
    """(n_chunks, chunk) of the two-level scan: chunk = ceil(√S), n_chunks·chunk >= S."""
    chunk = math.ceil(math.sqrt(S))
    return math.ceil(S / chunk), chunk


def _sqrt_scan(body, carry, S: int):
    """Steps are padded to n_chunks·chunk; the body must treat t >= S as a skipped step
    (the loop does: t >= S >= n). Only the first S per-step outputs are returned."""
    if S <= 2:  # too short to nest: √S chunks of one step is per-iteration remat
        return _iteration_scan(body, carry, S)
    n_chunks, chunk = sqrt_chunks(S)
    inner = _checkpoint(body)

    def outer(c, ts_C):
        return jax.lax.scan(inner, c, ts_C)

    carry, ys = jax.lax.scan(_checkpoint(outer), carry, jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk))
    ys = jax.tree.map(lambda y: y.reshape(n_chunks * chunk, *y.shape[2:])[:S], ys)
    return carry, ys


@dataclass(frozen=True)
class RematPolicy:
    keeps: str  # what the backward pass holds, for docs and --help
    checkpoint_blocks: bool  # jax.checkpoint around each block call
    scan: Scan  # how the iteration loop is scanned (model.loop=scan)
    store: str  # what the while-loop driver keeps per step (model.loop=while; asura.model.dynamic_loop)


POLICIES: Registry[RematPolicy] = Registry("model.remat", "what the iteration loop keeps for the backward pass")
POLICIES.add("none", RematPolicy("every iteration's activations", False, _plain_scan, "residuals"))
POLICIES.add("block", RematPolicy("each block's input; block insides recomputed", True, _plain_scan, "residuals"))
POLICIES.add(
    "iteration", RematPolicy("the carries only; one iteration recomputed at a time", False, _iteration_scan, "carries")
)
POLICIES.add("sqrt", RematPolicy("~2√S carries plus one iteration's activations", False, _sqrt_scan, "sqrt"))


def wrap_block(fn: Callable, policy: str) -> Callable:
    return _checkpoint(fn) if POLICIES[policy].checkpoint_blocks else fn


def scan_iterations(body: Callable, carry, S: int, policy: str):
    """lax.scan of body(carry, t) over t = 0..S-1 under a remat policy."""
    return POLICIES[policy].scan(body, carry, S)
