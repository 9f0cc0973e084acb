"""KV cache for the looped model: prefill and decode at a TRACED depth n, reusing the model's own blocks.

Data flow of one `extend` call (a chunk of C new tokens: the prompt for prefill, 1 token to decode):

    e = Emb(tokens_BC)                         h_0 = e (model.loop_start=zero: 0)
    for t = 0 .. S-1   (lax.scan; S = the cache's static loop length; t >= n skipped, as in training)
        s = model.slot(t)                      per-iteration parameters (extrapolation last | cycle)
        h, k/v per layer = model.iteration_cached(h, e, s, positions, attend)
            attend(layer, q, k, v): the chunk's queries over
                [the cache's k/v of earlier tokens | the chunk's own k/v, causal]
            per_iteration reads slot t of the cache; shared_last reads its one slot
        per_iteration: the chunk's k/v of step t -> slot t (a per-step scan output)
    shared_last: the chunk's k/v of step n-1 -> the one slot (carried through the scan)
    logits = model.head(h)                     [B, C, V] fp32

Invariants a contributor must keep:
* ONE COMPILED PROGRAM SERVES EVERY DEPTH n <= S for a given (cache, chunk) shape: n is a
  traced int32 and the skip rule is a lax.cond, exactly as in asura.model.looped.
* Rows are LEFT-padded: every row writes a chunk at the same cache index `length`. Padding has
  segment id 0, and a key is visible only to queries of its own segment, so padding never
  reaches a real token. RoPE positions are each row's own (restarting at every segment, as
  training's default_positions), continued across calls from `next_position_B`.
* `prefill` (a fresh cache) runs the model's configured attention (model.attention: xla, cudnn,
  pallas) on the chunk exactly as training does; later chunks attend over the cache with a
  masked einsum (XLA, any backend): the attention kernels have no cache-offset mask.
* Per-token halting (``halt``, asura.model.halting, kv=copy): the loop goes on while t < n and
  some chunk token is active; an exited token's keys/values of its last computed iteration are
  what later iterations read (the chunk's own, and slot t >= its exit of per_iteration, which it
  fills with them), so its later iterations are never computed. Same semantics as the model's
  forward under halting.
* A cache is filled at one depth: per_iteration slots t >= n are left empty, so decode at the
  depth the prefill used. Capacity: length + C <= T, checked by `CachedModel` (inside a jit,
  lax.dynamic_update_slice would clamp silently).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from asura.infer.policies import POLICIES
from asura.model import halting
from asura.model.attention import attention
from asura.model.carry import concrete_depth, default_positions, depth_index, poison
from asura.parallel.logical import constrain


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k_RLBTKH", "v_RLBTKH", "segment_ids_BT", "length", "next_position_B", "segment_B"],
    meta_fields=["policy", "scan_len"],
)
@dataclass(frozen=True)
class KVCache:
    k_RLBTKH: jax.Array  # R slots (S for per_iteration, 1 for shared_last), L layers, T positions
    v_RLBTKH: jax.Array
    segment_ids_BT: jax.Array  # int32 per cache position; 0 = padding or not written yet
    length: jax.Array  # int32 scalar: positions written (the same for every row)
    next_position_B: jax.Array  # RoPE position of each row's next token
    segment_B: jax.Array  # segment id of each row's last token (the one a new token continues)
    policy: str  # asura.infer.policies.POLICIES name
    scan_len: int  # S: the static loop length; serves every depth n <= S

    @property
    def capacity(self) -> int:
        return self.segment_ids_BT.shape[1]

    def nbytes(self) -> int:
        return self.k_RLBTKH.nbytes + self.v_RLBTKH.nbytes


class Step(NamedTuple):
    logits_BCV: jax.Array  # fp32 logits of every chunk position (the final iteration's)
    cache: KVCache
    depth_BC: jax.Array | None = None  # under halting: the iterations each chunk token ran


def init_cache(model, batch: int, max_len: int, policy: str = "per_iteration", max_depth: int | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens, serving every depth <= max_depth
    (default model.max_iterations; past it needs model.extrapolation, else a DepthError)."""
    pol = POLICIES[policy]
    if not pol.cached:
        raise ValueError(f"cache policy {policy!r} keeps no KV cache; it is generation's uncached path")
    cfg = model.cfg
    S = model.scan_len(max_depth or cfg.max_iterations)
    shape = (pol.slots(S), cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.d_head)
    zeros_i = jnp.zeros((batch,), jnp.int32)
    return KVCache(
        jnp.zeros(shape, model.dtype),
        jnp.zeros(shape, model.dtype),
        jnp.zeros((batch, max_len), jnp.int32),
        jnp.zeros((), jnp.int32),
        zeros_i,
        zeros_i,
        policy,
        S,
    )


def cached_attention(q_BCNH, kc_BTKH, vc_BTKH, k_BCKH, v_BCKH, cache_vis_BCT, chunk_vis_BCC) -> jax.Array:
    """Softmax attention of C queries over [T cached keys | the chunk's C keys] with explicit masks;
    the conventions of asura.model.attention.xla_attention (fp32 scores, GQA by head grouping)."""
    B, C, N, H = q_BCNH.shape
    K = kc_BTKH.shape[2]
    q_BCKGH = q_BCNH.reshape(B, C, K, N // K, H)
    scale = 1.0 / jnp.sqrt(jnp.float32(H))
    sc_BKGCT = jnp.einsum("bckgh,btkh->bkgct", q_BCKGH, kc_BTKH, preferred_element_type=jnp.float32) * scale
    sn_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", q_BCKGH, k_BCKH, preferred_element_type=jnp.float32) * scale
    s_BKGCX = jnp.concatenate([sc_BKGCT, sn_BKGCS], axis=-1)
    vis_B11CX = jnp.concatenate([cache_vis_BCT, chunk_vis_BCC], axis=-1)[:, None, None]
    p_BKGCX = jax.nn.softmax(jnp.where(vis_B11CX, s_BKGCX, -1e30), axis=-1)
    p_BKGCX = jnp.where(vis_B11CX, p_BKGCX, 0.0).astype(vc_BTKH.dtype)
    T = kc_BTKH.shape[1]
    o_BCKGH = jnp.einsum("bkgct,btkh->bckgh", p_BKGCX[..., :T], vc_BTKH, preferred_element_type=jnp.float32)
    o_BCKGH += jnp.einsum("bkgcs,bskh->bckgh", p_BKGCX[..., T:], v_BCKH, preferred_element_type=jnp.float32)
    return o_BCKGH.reshape(B, C, N, H).astype(q_BCNH.dtype)


def _positions(seg_BC, prev_seg_B, next_pos_B) -> jax.Array:
    """RoPE positions of a chunk: restart at each segment, continuing the cache's last segment."""
    B, C = seg_BC.shape
    continues_BC = jnp.cumprod((seg_BC == prev_seg_B[:, None]).astype(jnp.int32), axis=1)
    return default_positions(seg_BC, B, C) + continues_BC * next_pos_B[:, None]


def _check_halt(halt) -> None:
    if halt is not None and halt.kv != "copy":
        raise ValueError("the KV-cached decoder halts with kv=copy only (kv=full computes every iteration)")


def _extend(model, cache: KVCache, tokens_BC, n, segment_ids_BC, positions_BC, fresh: bool, halt=None) -> Step:
    cfg = model.cfg
    _check_halt(halt)
    pol = POLICIES[cache.policy]
    S = cache.scan_len
    B, C = tokens_BC.shape
    dt = cache.k_RLBTKH.dtype
    if fresh:  # prefill: the chunk starts the cache at index 0
        off = jnp.zeros((), jnp.int32)
        prev_seg_B = next_pos_B = jnp.zeros((B,), jnp.int32)
        seg_BC = jnp.ones((B, C), jnp.int32) if segment_ids_BC is None else segment_ids_BC.astype(jnp.int32)
    else:
        off, prev_seg_B, next_pos_B = cache.length, cache.segment_B, cache.next_position_B
        seg_BC = jnp.broadcast_to(prev_seg_B[:, None], (B, C)) if segment_ids_BC is None else segment_ids_BC
        seg_BC = seg_BC.astype(jnp.int32)
    pos_BC = _positions(seg_BC, prev_seg_B, next_pos_B) if positions_BC is None else positions_BC
    if (d := concrete_depth(n)) is not None and not 1 <= d <= S:
        raise ValueError(f"depth n={d} is outside the cache's 1..{S} (init it with max_depth)")
    n_arr, valid = depth_index(n, S)  # a traced n outside 1..S gives NaN logits, never the clamped depth's
    e_BCD = constrain(model.embed[...][tokens_BC].astype(model.dtype), ("batch", "seq", "embed"))

    T = cache.capacity
    cache_vis_BCT = (jnp.arange(T)[None, None, :] < off) & (cache.segment_ids_BT[:, None, :] == seg_BC[:, :, None])
    causal_CC = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]
    chunk_vis_BCC = causal_CC[None] & (seg_BC[:, :, None] == seg_BC[:, None, :])

    def attend_fn(kc_LBTKH, vc_LBTKH, hs=None):
        def attend(layer, p):
            k_BCKH, v_BCKH = p.k_BTKH, p.v_BTKH
            if hs is not None:  # halting: an exited chunk token offers its last computed k/v
                k_BCKH, v_BCKH = halting.offered(hs, layer, k_BCKH, v_BCKH)
            if fresh:  # the training call: configured impl, causal within the chunk, segments as given
                return attention(
                    p.q_BTNH, k_BCKH, v_BCKH, segment_ids_BT=segment_ids_BC, causal=True,
                    impl=cfg.attention, block_q=cfg.attn_block_q, block_k=cfg.attn_block_k,
                )  # fmt: skip
            return cached_attention(
                p.q_BTNH, kc_LBTKH[layer], vc_LBTKH[layer], k_BCKH, v_BCKH, cache_vis_BCT, chunk_vis_BCC
            )

        return attend

    def run(h_BCD, t, kc_LBTKH, vc_LBTKH, hs=None):
        it = model.iteration_cached(h_BCD, e_BCD, model.slot(t), pos_BC, attend_fn(kc_LBTKH, vc_LBTKH, hs))
        return it.h_BTD, jnp.stack(it.k_LBTKH).astype(dt), jnp.stack(it.v_LBTKH).astype(dt)

    kv_shape = (cfg.n_layers, B, C, cfg.kv_heads, cfg.d_head)
    depth_BC = None
    if halt is not None:
        hs0 = halting.init(halt, model.h0(e_BCD), cfg.vocab_size, kv_shape, dt, seg_BC != 0)

        def halt_step(c, t, kc_LBTKH, vc_LBTKH):
            """Iteration t for the active chunk tokens; (h, halt state) with k/v of each token's last."""
            h_BCD, hs = c
            h_new, k_LBCKH, v_LBCKH = run(h_BCD, t, kc_LBTKH, vc_LBTKH, hs)
            return halting.advance(halt, hs, h_BCD, h_new, model, t, (k_LBCKH, v_LBCKH))

        def live(c, t):
            return (t < n_arr) & halting.any_active(c[1])

    if halt is not None and pol.per_iteration:
        # slot t gets each token's last computed k/v: this step's if it ran it, its exit's if not

        def body(c, xs):
            t, kc_LBTKH, vc_LBTKH = xs

            def stop(c):
                keep = t < n_arr  # slots past the depth stay empty, as without halting
                return c, (jnp.where(keep, c[1].k_LBTKH, 0), jnp.where(keep, c[1].v_LBTKH, 0))

            def go(c):
                c = halt_step(c, t, kc_LBTKH, vc_LBTKH)
                return c, (c[1].k_LBTKH, c[1].v_LBTKH)

            return jax.lax.cond(live(c, t), go, stop, c)

        kv_xs = (None, None) if fresh else (cache.k_RLBTKH, cache.v_RLBTKH)
        (h_BCD, hs), (k_new, v_new) = jax.lax.scan(body, (model.h0(e_BCD), hs0), (jnp.arange(S), *kv_xs))
        depth_BC = hs.depth_BT
    elif halt is not None:  # shared_last: each token's last computed k/v goes to the one slot
        kc_LBTKH, vc_LBTKH = cache.k_RLBTKH[0], cache.v_RLBTKH[0]

        def body(c, t):
            return jax.lax.cond(live(c, t), lambda c: halt_step(c, t, kc_LBTKH, vc_LBTKH), lambda c: c, c), None

        (h_BCD, hs), _ = jax.lax.scan(body, (model.h0(e_BCD), hs0), jnp.arange(S))
        k_new, v_new, depth_BC = hs.k_LBTKH[None], hs.v_LBTKH[None], hs.depth_BT
    elif pol.per_iteration:  # slot t in, the step's k/v out (scan input/output; skipped steps write zeros)

        def body(h_BCD, xs):
            t, kc_LBTKH, vc_LBTKH = xs
            skip = lambda h: (h, jnp.zeros(kv_shape, dt), jnp.zeros(kv_shape, dt))
            h_BCD, k_LBCKH, v_LBCKH = jax.lax.cond(t < n_arr, lambda h: run(h, t, kc_LBTKH, vc_LBTKH), skip, h_BCD)
            return h_BCD, (k_LBCKH, v_LBCKH)

        kv_xs = (None, None) if fresh else (cache.k_RLBTKH, cache.v_RLBTKH)  # a fresh cache is never read
        h_BCD, (k_new, v_new) = jax.lax.scan(body, model.h0(e_BCD), (jnp.arange(S), *kv_xs))
    else:  # one shared slot read by every step; the last step's k/v is carried out
        kc_LBTKH, vc_LBTKH = cache.k_RLBTKH[0], cache.v_RLBTKH[0]

        def body(carry, t):
            new = jax.lax.cond(t < n_arr, lambda c: run(c[0], t, kc_LBTKH, vc_LBTKH), lambda c: c, carry)
            return new, None

        zeros = jnp.zeros(kv_shape, dt)
        (h_BCD, k_last, v_last), _ = jax.lax.scan(body, (model.h0(e_BCD), zeros, zeros), jnp.arange(S))
        k_new, v_new = k_last[None], v_last[None]
    at = (0, 0, 0, off, 0, 0)
    new_cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k_RLBTKH, k_new, at),
        jax.lax.dynamic_update_slice(cache.v_RLBTKH, v_new, at),
        jax.lax.dynamic_update_slice(cache.segment_ids_BT, seg_BC, (0, off)),
        off + C,
        pos_BC[:, -1].astype(jnp.int32) + 1,
        seg_BC[:, -1],
        cache.policy,
        S,
    )
    logits = model.head(h_BCD)
    return Step(logits if valid is None else poison(logits, valid), new_cache, depth_BC)


def prefill(model, cache: KVCache, tokens_BT, n, *, segment_ids_BT=None, positions_BT=None, halt=None) -> Step:
    """Fill `cache` from index 0 with a (left-padded) prompt at depth n (traceable; n may be traced).

    Runs the model's configured attention over the prompt, as training does; segment ids (0 =
    padding) and positions default to one document per row starting at position 0.
    """
    return _extend(model, cache, tokens_BT, n, segment_ids_BT, positions_BT, fresh=True, halt=halt)


def extend(model, cache: KVCache, tokens_BC, n, *, segment_ids_BC=None, positions_BC=None, halt=None) -> Step:
    """Append C tokens to every row (decode: C = 1) at depth n; they continue each row's last
    segment unless segment ids are given (traceable; n may be traced)."""
    return _extend(model, cache, tokens_BC, n, segment_ids_BC, positions_BC, fresh=False, halt=halt)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("fresh",), donate_argnames=("cache",))
def _extend_jit(graphdef, state, cache, tokens, n, segment_ids, positions, fresh, halt=None):
    return _extend(nnx.merge(graphdef, state), cache, tokens, n, segment_ids, positions, fresh, halt)


class CachedModel:
    """Jitted prefill / extend for one model. n is traced: each (cache, chunk) shape compiles once
    for every depth. The cache passed in is donated (updated in place); use the one returned.
    halt: per-token halting (asura.model.halting.HaltSpec, kv=copy); Step.depth_BC reports it."""

    def __init__(self, model, halt=None):
        _check_halt(halt)
        self.model, self.halt = model, halt
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)

    def init(self, batch: int, max_len: int, policy: str = "per_iteration", max_depth: int | None = None):
        return init_cache(self.model, batch, max_len, policy, max_depth)

    def _check(self, cache: KVCache, tokens, n, fresh: bool) -> None:
        start = 0 if fresh else int(cache.length)
        if start + tokens.shape[1] > cache.capacity:
            raise ValueError(f"{tokens.shape[1]} tokens at position {start} overflow a cache of {cache.capacity}")
        d = concrete_depth(n)
        if d is not None and not 1 <= d <= cache.scan_len:
            raise ValueError(f"depth n={n} is outside the cache's 1..{cache.scan_len} (init it with max_depth)")

    def prefill(self, cache: KVCache, tokens_BT, n, *, segment_ids_BT=None, positions_BT=None) -> Step:
        self._check(cache, tokens_BT, n, True)
        tokens_BT = jnp.asarray(tokens_BT)
        return _extend_jit(
            self.graphdef,
            self.state,
            cache,
            tokens_BT,
            jnp.int32(n),
            segment_ids_BT,
            positions_BT,
            fresh=True,
            halt=self.halt,
        )

    def extend(self, cache: KVCache, tokens_BC, n, *, segment_ids_BC=None, positions_BC=None) -> Step:
        self._check(cache, tokens_BC, n, False)
        tokens_BC = jnp.asarray(tokens_BC)
        return _extend_jit(
            self.graphdef,
            self.state,
            cache,
            tokens_BC,
            jnp.int32(n),
            segment_ids_BC,
            positions_BC,
            fresh=False,
            halt=self.halt,
        )
