"""Teacher-forced scoring: log p(continuation | context), what lm-evaluation-harness asks a model.

    (context, continuation) token lists --pack--> rows [context + continuation[:-1]], right-padded
    one jitted forward per batch (depth n traced):  logp_BT = log_softmax(logits)[targets]
    loglikelihood = Σ logp over the continuation's positions;  greedy = every target is the argmax

The forward is the model's own (LoopedLM.__call__, the training program), so summed over a
task's continuations this is the model's CE times the token count (tests/test_infer_score.py).
The model has no BOS token: a context must hold at least one token, and a rolling
log-likelihood leaves a document's first token unscored (as training never predicts it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class LogLik(NamedTuple):
    logprob: float  # Σ log p(continuation token | everything before it)
    greedy: bool  # every continuation token is the argmax


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_depth",))
def _token_logprobs(graphdef, state, inputs_BT, targets_BT, segment_ids_BT, n, max_depth):
    model = nnx.merge(graphdef, state)
    logits_BTV = model(inputs_BT, n=n, segment_ids_BT=segment_ids_BT, max_depth=max_depth)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def _bucket(length: int, max_len: int) -> int:
    """Row length rounded up to a power of two (>= 16), so a task compiles a handful of shapes."""
    return min(max_len, max(16, 1 << (length - 1).bit_length()))


def loglikelihoods(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    n: int,
    *,
    max_len: int,
    batch_size: int = 16,
    max_depth: int | None = None,
) -> list[LogLik]:
    """log p(continuation | context) per (context, continuation) pair at depth n.

    A pair longer than max_len keeps its last max_len tokens (the context is cut from the left);
    the continuation must fit with at least one context token.
    """
    max_depth = max_depth or max(n, model.cfg.max_iterations)
    model.scan_len(n, max_depth)  # DepthError past max_iterations without extrapolation
    rows = []
    for ctx, cont in pairs:
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("a context and a continuation need at least one token each (the model has no BOS)")
        if len(cont) >= max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_len={max_len} with its context")
        seq = (list(ctx) + list(cont))[-(max_len + 1) :]
        rows.append((np.asarray(seq, np.int32), len(cont)))
    graphdef, state = nnx.split(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    out: list[LogLik | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = _bucket(max(len(rows[i][0]) - 1 for i in idx), max_len)
        B = batch_size if len(order) > batch_size else len(idx)  # a fixed batch: one compile per length
        inputs, targets, seg = (np.zeros((B, T), np.int32) for _ in range(3))
        for b, i in enumerate(idx):
            seq, _ = rows[i]
            L = len(seq) - 1
            inputs[b, :L], targets[b, :L], seg[b, :L] = seq[:-1], seq[1:], 1
        logp_BT, hit_BT = jax.device_get(
            _token_logprobs(graphdef, state, inputs, targets, seg, jnp.int32(n), max_depth=int(max_depth))
        )
        for b, i in enumerate(idx):
            seq, n_cont = rows[i]
            span = slice(len(seq) - 1 - n_cont, len(seq) - 1)
            out[i] = LogLik(float(logp_BT[b, span].sum(dtype=np.float64)), bool(hit_BT[b, span].all()))
    return out


def rolling_windows(tokens: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token but the first exactly once.

    Windows predict up to max_len - 1 new tokens each and see the max_len tokens ending at their
    last prediction, so the last window keeps a full context (lm-eval's rolling scheme, minus the
    BOS prefix token this model does not have).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    tokens = list(tokens)
    out = []
    for a in range(1, len(tokens), max_len - 1):
        b = min(a + max_len - 1, len(tokens))
        out.append((tokens[max(0, b - max_len) : a], tokens[a:b]))
    return out
