"""Batched generation from ragged prompts at a traced depth n, with a KV cache policy by name.

    prompts (token lists, any lengths >= 1) --left_pad--> tokens_BP, segment_ids_BP (0 = padding)
    one jitted program:
        state, logits = start()                    prefill the cache (or the token buffer: recompute)
        token_0 = sample(logits, key_0)
        while i < max_new_tokens and some row is not done:
            state, logits = step(state, token_{i-1})   one decode step for every row
            token_i = sample(logits, key_i);  rows already done emit 0 and stay done
            a row is done once it emits a stop token (kept in its output)

Per-token halting (``halt``, asura.model.halting, kv=copy; cached policies): each position stops
iterating when its exit rule fires, and a decode step's loop ends when every row's token has
exited; `Generated.depths` records the iterations that produced each new token.

Rows are independent: left padding is invisible to real tokens (segment 0), each row's RoPE
positions are its own, and row b samples step i with fold_in(key(seed_b), i). So a row generates
the same tokens alone or in a ragged batch, sampled or greedy, given its seed (an int `seed`
gives row b the seed seed + b).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.infer.cache import extend, init_cache, prefill
from asura.infer.policies import POLICIES
from asura.infer.sample import Sampling, sample
from asura.model.carry import default_positions

GREEDY = Sampling()


class Generated(NamedTuple):
    tokens: list[list[int]]  # new tokens of each row, its stop token included when it hit one
    stopped: list[bool]  # whether the row emitted a stop token
    logprobs: list[list[float]]  # log p(token) under the final iteration's logits (temperature 1)
    depths: list[list[int]] | None = None  # iterations run by the position that produced each token (n: no halting)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BP, segment_ids_BP): prompts right-aligned, padding (token 0) has segment 0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the model has no BOS token to start from)")
    P = max(len(p) for p in prompts)
    tokens_BP = np.zeros((len(prompts), P), np.int32)
    seg_BP = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens_BP[b, P - len(p) :] = np.asarray(p, np.int32)
        seg_BP[b, P - len(p) :] = 1
    return tokens_BP, seg_BP


def _cached_decoder(model, policy, tokens_BP, seg_BP, n, max_new, max_depth, halt=None):
    B, P = tokens_BP.shape
    cache = init_cache(model, B, P + max_new, policy, max_depth)

    def depth(st):
        return jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,)) if halt is None else st.depth_BC[:, -1]

    def start():
        st = prefill(model, cache, tokens_BP, n, segment_ids_BT=seg_BP, halt=halt)
        return st.cache, st.logits_BCV[:, -1], depth(st)

    def step(state, tok_B):
        st = extend(model, state, tok_B[:, None], n, halt=halt)
        return st.cache, st.logits_BCV[:, -1], depth(st)

    return start, step


def _recompute_decoder(model, tokens_BP, seg_BP, n, max_new, max_depth):
    """No cache: every step reruns the full forward over the whole [B, P + max_new] buffer."""
    B, P = tokens_BP.shape
    tail = jnp.zeros((B, max_new), jnp.int32)
    buf_BT = jnp.concatenate([tokens_BP, tail], axis=1)
    seg_BT = jnp.concatenate([jnp.ones((B, P), jnp.int32) if seg_BP is None else seg_BP, tail], axis=1)
    T = P + max_new

    def logits_at(buf_BT, seg_BT, i):
        pos_BT = default_positions(seg_BT, B, T)
        h_BTD = model.run_loop(buf_BT, n, positions_BT=pos_BT, segment_ids_BT=seg_BT, max_depth=max_depth).h_BTD
        return model.head(jax.lax.dynamic_slice_in_dim(h_BTD, i, 1, axis=1))[:, 0]

    n_B = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,))

    def start():
        return (buf_BT, seg_BT, jnp.int32(P)), logits_at(buf_BT, seg_BT, P - 1), n_B

    def step(state, tok_B):
        buf_BT, seg_BT, length = state
        buf_BT = jax.lax.dynamic_update_slice(buf_BT, tok_B[:, None], (0, length))
        seg_BT = jax.lax.dynamic_update_slice(seg_BT, seg_BT[:, P - 1 : P], (0, length))  # continue the prompt
        return (buf_BT, seg_BT, length + 1), logits_at(buf_BT, seg_BT, length), n_B

    return start, step


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new", "sampling", "stop", "policy", "max_depth"))
def _generate(graphdef, state, tokens_BP, seg_BP, n, seeds_B, halt=None, *, max_new, sampling, stop, policy, max_depth):
    model = nnx.merge(graphdef, state)
    if POLICIES[policy].cached:
        start, step = _cached_decoder(model, policy, tokens_BP, seg_BP, n, max_new, max_depth, halt)
    else:
        start, step = _recompute_decoder(model, tokens_BP, seg_BP, n, max_new, max_depth)
    keys_B = jax.vmap(jax.random.key)(seeds_B)
    stop_S = jnp.asarray(stop, jnp.int32)
    B = tokens_BP.shape[0]

    def emit(i, logits_BV, done_B):
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
        tok_B = jnp.where(done_B, 0, sample(logits_BV, step_keys_B, sampling))
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
        hit_B = jnp.isin(tok_B, stop_S) if stop else jnp.zeros_like(done_B)
        return tok_B, logp_B, done_B | hit_B

    dec, logits_BV, depth_B = start()
    no_B = jnp.zeros((B,), bool)
    tok_B, logp_B, done_B = emit(0, logits_BV, no_B)
    out_BK = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(tok_B)
    lp_BK = jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(logp_B)
    dep_BK = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(depth_B)
    len_B = jnp.ones((B,), jnp.int32)

    def cond(c):
        i, *_, done_B, _ = c
        return (i < max_new) & ~jnp.all(done_B)

    def body(c):
        i, dec, tok_B, out_BK, lp_BK, dep_BK, done_B, len_B = c
        dec, logits_BV, depth_B = step(dec, tok_B)
        new_B, logp_B, new_done_B = emit(i, logits_BV, done_B)
        out_BK = jax.lax.dynamic_update_slice(out_BK, new_B[:, None], (0, i))
        lp_BK = jax.lax.dynamic_update_slice(lp_BK, logp_B[:, None], (0, i))
        dep_BK = jax.lax.dynamic_update_slice(dep_BK, depth_B[:, None], (0, i))
        return i + 1, dec, new_B, out_BK, lp_BK, dep_BK, new_done_B, len_B + (~done_B).astype(jnp.int32)

    c = (jnp.int32(1), dec, tok_B, out_BK, lp_BK, dep_BK, done_B, len_B)
    _, _, _, out_BK, lp_BK, dep_BK, done_B, len_B = jax.lax.while_loop(cond, body, c)
    return out_BK, lp_BK, dep_BK, done_B, len_B


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_tokens: Sequence[int] = (),
    seed: int | Sequence[int] = 0,
    cache: str = "per_iteration",
    max_depth: int | None = None,
    halt=None,
) -> Generated:
    """Generate up to max_new_tokens for each prompt (token-id lists of any lengths) at depth n.

    One compiled program per (batch, prompt length, max_new_tokens, sampling, stop tokens, cache
    policy, max_depth); n and seed are traced, so every depth <= max_depth (default max(n,
    model.max_iterations)) reuses it. Depths past max_iterations need model.extrapolation.
    """
    POLICIES[cache]  # an unknown policy fails here, with the valid names
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"depth must be >= 1, got {n}")
    max_depth = max_depth or max(n, model.cfg.max_iterations)
    model.scan_len(n, max_depth)  # DepthError past max_iterations without extrapolation
    if halt is not None and (not POLICIES[cache].cached or halt.kv != "copy"):
        raise ValueError(f"halting decodes with a KV cache and kv=copy, got cache={cache!r}, kv={halt.kv!r}")
    tokens_BP, seg_BP = left_pad(prompts)
    seeds_B = np.asarray([seed + b for b in range(len(prompts))] if np.ndim(seed) == 0 else seed, np.int64)
    if seeds_B.shape != (len(prompts),) or seeds_B.min() < 0 or seeds_B.max() >= 2**31:
        raise ValueError(f"seed must be an int or one per prompt, each in [0, 2^31), got {seed}")
    V = model.cfg.vocab_size
    if tokens_BP.max() >= V or tokens_BP.min() < 0:
        raise ValueError(f"prompt token ids must be in [0, {V}), got {tokens_BP.min()}..{tokens_BP.max()}")
    ragged = bool((seg_BP == 0).any())  # without padding, pass no segment ids (every attention impl serves that)
    graphdef, state = nnx.split(model)
    out_BK, lp_BK, dep_BK, done_B, len_B = jax.device_get(
        _generate(
            graphdef, state, jnp.asarray(tokens_BP), jnp.asarray(seg_BP) if ragged else None,
            jnp.int32(n), jnp.asarray(seeds_B, jnp.int32), halt, max_new=int(max_new_tokens), sampling=sampling,
            stop=tuple(int(s) for s in stop_tokens), policy=cache, max_depth=int(max_depth),
        )
    )  # fmt: skip
    rows = range(len(prompts))
    return Generated(
        [out_BK[b, : len_B[b]].tolist() for b in rows],
        [bool(done_B[b]) for b in rows],
        [lp_BK[b, : len_B[b]].tolist() for b in rows],
        [dep_BK[b, : len_B[b]].tolist() for b in rows],
    )
