"""Teacher-forced scoring: log p(continuation | context), what lm-evaluation-harness asks a model.

    (context, continuation) token lists --pack--> rows [context + continuation[:-1]], right-padded
    one jitted forward per batch (depth n traced):  logp_BT = log_softmax(logits)[targets]
    loglikelihood = Σ logp over the continuation's positions;  greedy = every target is the argmax

The forward is the model's own (LoopedLM.__call__, the training program), so summed over a
task's continuations this is the model's CE times the token count (tests/test_infer_score.py).
The model has no BOS token: a context must hold at least one token, and a rolling
log-likelihood leaves a document's first token unscored (as training never predicts it).

Rolling log-likelihood (`rolling_windows`) is lm-eval's scheme exactly, as its HF model runs it
(lm_eval.utils.get_rolling_token_windows with context_len=1, then make_disjoint_window), with
one difference: lm-eval's first window is [EOT] + tokens[:L-1] predicting tokens[:L]; here it is
tokens[:L-1] predicting tokens[1:L]. So token 0 is not scored (lm-eval scores log p(token 0 |
EOT)), and the first window's tokens sit one position earlier and do not see an EOT token. Every
later window is lm-eval's: it predicts the next (up to) L tokens from the L tokens before its
last prediction, so every token after the first L is scored with lm-eval's context.
"""

from __future__ import annotations

import functools
import itertools
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
        if len(cont) > max_len:  # inputs = one context token + cont[:-1] must fit max_len
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
    """(context, continuation) windows that score every token but the first exactly once: lm-eval's
    rolling windows with the first token as the first window's context (see the module docstring).

    Window j predicts tokens[b_j : b_j+1] with b_0 = 1, b_1 = min(max_len, N), then max_len more
    per window; its inputs (context + continuation[:-1]) are the at most max_len tokens ending just
    before its last prediction.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokens = list(tokens)
    N = len(tokens)
    if N < 2:
        return []
    bounds = [1, *range(min(max_len, N), N, max_len), N]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:  # max_len = 1: the first window predicts nothing
            out.append((tokens[max(0, hi - 1 - max_len) : lo], tokens[lo:hi]))
    return out


def rolling_loglikelihoods(
    model, docs: Sequence[Sequence[int]], n: int, *, max_len: int, batch_size: int = 16, max_depth: int | None = None
) -> list[float]:
    """Σ log p over every token of each document but its first, at depth n (`rolling_windows`);
    0.0 for a document of fewer than two tokens (nothing to score)."""
    per_doc = [rolling_windows(d, max_len) for d in docs]
    flat = [w for windows in per_doc for w in windows]
    scores = iter(loglikelihoods(model, flat, n, max_len=max_len, batch_size=batch_size, max_depth=max_depth))
    return [sum((next(scores).logprob for _ in windows), 0.0) for windows in per_doc]
