"""LoopedLM: one weight-shared stack of blocks applied n times (ASURA-style).

Data flow of one forward pass (tokens_BT, depth n):

    e_BTD = Emb(tokens)                    h_0 = e (model.loop_start=zero: h_0 = 0)
    for t = 0 .. S-1   (S = asura.depth.scan_length: max(max_iterations, requested depths))
        if t >= n: skip (carry passes through unchanged)
        s = slot(t)                        per-iteration parameter index; t, or
                                           min(t, M-1) / t % M when extrapolating
        u = inject(e, h)                   concat(e, h) @ W_proj[s] | h + e | h
        x = u; for each shared block b:    x = b(x; adapters ΔW[s])
                                           x = PostLN[s](x)      (post_norm)
        h = LN_s(x)                        (iter_norm)
        objective += w_t · (CE(head(h), y) + z·lse²)   (latent guidance, streamed in the carry)
    logits = head(h_{n-1}) = FinalNorm(h) @ Wᵤ   (fp32)

Depth range: a concrete n (a Python int or a concrete array) outside 1..S raises, or extends S
when model.extrapolation allows. A traced n cannot be checked while tracing, and indexing needs it
in range, so the loop runs min(max(n, 1), S) steps but every output of an out-of-range n is NaN
(never the silently clamped depth's values): pass max_depth to run traced depths past max_iterations.

Invariant a contributor must keep: ONE COMPILED PROGRAM SERVES EVERY DEPTH n <= S. n is a
traced int32, so nothing about n may become a static shape or a Python branch. Two drivers run
the loop (model.loop): ``while`` (default, asura.model.dynamic_loop) runs t < n in a
lax.while_loop with a custom VJP over the executed steps only, so steps t >= n cost nothing;
``scan`` is a lax.scan over S steps whose body picks skip / frozen / run with lax.switch. A depth
past max_iterations is legal only through model.extrapolation (asura.depth.scan_length checks).

One step function (`_step`) serves both drivers: the scanned one (production) and the
unrolled one (`unroll=True`, a static n, no scan/cond/remat: the reference the scanned path
is tested against). Truncated backprop (bptt_k = k > 0) runs steps t < n − k under
stop_gradient. Latent guidance is a `Scoring` passed in: the loop adds w_S[t] · score(h_t)
to the carry, so memory does not grow with n.

Per-token halting (``halt=HaltSpec``, asura.model.halting): `LoopCarry.state` holds each token's
active flag, depth and exit-rule state; a token stops when its rule fires, and the loop runs while
t < n and any token is active (both drivers and asura.infer read the same condition). With no
HaltSpec the state is empty and the program is the one above.

Seams:
* a KV cache (generation, asura.infer): `iteration_cached` is `iteration` with the attention
  supplied by the caller (it attends over cached keys/values) and each layer's new k/v
  returned; both run `_iterate`, the one sequence of per-iteration ops, and asura.infer
  drives its own scan over t (same slot(t), same skip rule) so the training program is untouched.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.compat import nnx_list
from asura.config.schema import ModelConfig
from asura.depth import scan_length
from asura.model import halting, remat
from asura.model.attention import attention
from asura.model.block import Block
from asura.model.carry import (
    GateScoring,
    GateState,
    HaltGate,
    Iterated,
    LoopCarry,
    LoopResult,
    Scoring,
    StepOut,
    concrete_depth,
    default_positions,
    depth_index,
    frozen,
    poison,
    projconcat_init,
)
from asura.model.dynamic_loop import dynamic_loop
from asura.model.layers import DTYPES, Norm, dense, f32, normal, param
from asura.model.loss import (
    Score,
    entropy_terms,
    exit_distribution,
    guidance_weights,
    masked_mean,
    scores,
    token_scores,
)
from asura.parallel.logical import constrain


def _halt_of(state):
    """The halting state inside LoopCarry.state (HaltGate carries it beside the gate's)."""
    return state.halt if isinstance(state, HaltGate) else state


class LoopedLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        remat.POLICIES[cfg.remat]  # an unknown policy fails here, not at trace time
        self.cfg = cfg
        D, V, M = cfg.d_model, cfg.vocab_size, cfg.max_iterations
        self.embed = param(rngs, normal(cfg.init_std), (V, D), ("vocab", "embed"), cfg)
        self.blocks = nnx_list([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        proj = cfg.injection == "projconcat"
        proj_names = ("iteration", None, "embed")
        self.w_proj = param(rngs, projconcat_init(cfg.init_std), (M, 2 * D, D), proj_names, cfg) if proj else None
        self.post_norm = Norm(cfg, D, rngs=rngs, stack=M) if cfg.post_norm else None
        self.iter_norm = Norm(cfg, D, rngs=rngs, stack=M) if cfg.iter_norm else None
        self.final_norm = Norm(cfg, D, rngs=rngs)
        # exit gate (model.exit_gate): b = 0 starts every token at λ = σ(w·x) ≈ 1/2 per iteration
        self.w_gate = param(rngs, normal(cfg.init_std), (D,), ("embed",), cfg) if cfg.exit_gate else None
        self.b_gate = param(rngs, nnx.initializers.zeros, (1,), (None,), cfg) if cfg.exit_gate else None
        self.unembed = (
            None if cfg.tie_embeddings else param(rngs, normal(cfg.init_std), (D, V), ("embed", "vocab"), cfg)
        )

    # ----------------------------------------------------------------- pieces
    @property
    def dtype(self):
        return DTYPES[self.cfg.dtype]

    def w_DV(self) -> jax.Array:
        return self.embed[...].T if self.unembed is None else self.unembed[...]

    def head(self, h_BTD: jax.Array) -> jax.Array:
        """Shared final norm + unembedding; fp32 logits."""
        x_BTD = self.final_norm(h_BTD)
        logits_BTV = dense(x_BTD, self.w_DV().astype(x_BTD.dtype), f32(x_BTD.dtype))
        return constrain(logits_BTV, ("batch", "seq", "vocab"))

    def exit_logit(self, h_BTD: jax.Array, gate_only: bool = False) -> jax.Array:
        """w·FinalNorm(h) + b in fp32: the gate reads what the head reads (model.exit_gate). gate_only:
        its gradient reaches w and b alone (not the final norm or the latents)."""
        if self.w_gate is None:
            raise ValueError("the exit gate needs model.exit_gate=true (this model has no gate)")
        x_BTD = self.final_norm(h_BTD).astype(f32(self.dtype))
        x_BTD = jax.lax.stop_gradient(x_BTD) if gate_only else x_BTD
        return x_BTD @ self.w_gate[...].astype(x_BTD.dtype) + self.b_gate[...][0]

    def exit_prob(self, h_BTD: jax.Array) -> jax.Array:
        """λ_BT = σ(exit_logit(h)): the probability of exiting after the iteration that made h."""
        return jax.nn.sigmoid(self.exit_logit(h_BTD))

    def slot(self, t):
        """Per-iteration parameter index for loop step t (int or traced)."""
        M = self.cfg.max_iterations
        if self.cfg.extrapolation == "last":
            return jnp.minimum(t, M - 1)
        if self.cfg.extrapolation == "cycle":
            return t % M
        return t  # "none": scan_length guarantees t < M

    def scan_len(self, n, max_depth: int | None = None) -> int:
        """Static loop length S for depth n (checked when concrete) and an optional max_depth."""
        static_n = concrete_depth(n)
        if static_n is not None and static_n < 1:
            raise ValueError(f"depth n must be >= 1, got {n}")
        requested = [d for d in (static_n, max_depth) if d is not None]
        S = scan_length(self.cfg, requested)
        if static_n is not None and max_depth is not None and static_n > max_depth:
            raise ValueError(f"depth n={static_n} exceeds max_depth={max_depth}")
        return S

    def h0(self, e_BTD: jax.Array) -> jax.Array:
        """The state the first iteration reads. embed: h_0 = e, so with injection=add iteration 1
        sees 2e; zero: iteration 1 sees the injected e alone (Fan et al. 2024's looped model)."""
        return jnp.zeros_like(e_BTD) if self.cfg.loop_start == "zero" else e_BTD

    def iteration(self, h_BTD, e_BTD, s, positions_BT, segment_ids_BT, policy: str = "none"):
        """One loop step with per-iteration parameters at slot s: h_{t-1} -> h_t."""

        def run(i, block, x_BTD):
            return remat.wrap_block(lambda x, b=block: b(x, positions_BT, segment_ids_BT, s), policy)(x_BTD), None

        return self._iterate(h_BTD, e_BTD, s, run)[0]

    def iteration_cached(self, h_BTD, e_BTD, s, positions_BT, attend, policy: str = "none") -> Iterated:
        """`iteration` with attention supplied by the caller: attend(layer, QKV) -> o_BTNH (a KV
        cache, asura.infer; halting's copied keys/values). Also returns each layer's new keys/values."""

        def run(i, block, x_BTD):
            cached = lambda x, b=block: b.cached(x, positions_BT, s, functools.partial(attend, i))
            out = remat.wrap_block(cached, policy)(x_BTD)
            return out.x_BTD, (out.k_BTKH, out.v_BTKH)

        h_BTD, kv = self._iterate(h_BTD, e_BTD, s, run)
        return Iterated(h_BTD, tuple(k for k, _ in kv), tuple(v for _, v in kv))

    def iteration_copy(self, h_BTD, e_BTD, s, positions_BT, segment_ids_BT, halt: halting.Halt, policy="none"):
        """`iteration` where an exited token's keys/values are those of its last computed iteration
        (halting kv=copy); returns (h_BTD, (k_LBTKH, v_LBTKH)) of this iteration's projections."""
        cfg = self.cfg

        def attend(layer, p):
            k_BTKH, v_BTKH = halting.offered(halt, layer, p.k_BTKH, p.v_BTKH)
            return attention(
                p.q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT, causal=True,
                impl=cfg.attention, block_q=cfg.attn_block_q, block_k=cfg.attn_block_k,
            )  # fmt: skip

        it = self.iteration_cached(h_BTD, e_BTD, s, positions_BT, attend, policy)
        return it.h_BTD, (jnp.stack(it.k_LBTKH), jnp.stack(it.v_LBTKH))

    def _iterate(self, h_BTD, e_BTD, s, run_block):
        """The one sequence of per-iteration ops; run_block(i, block, x) -> (x, extra) calls block i."""
        cfg = self.cfg
        if cfg.injection == "projconcat":
            eh_BT2D = jnp.concatenate([e_BTD, h_BTD], axis=-1)
            x_BTD = dense(eh_BT2D, self.w_proj[...][s].astype(eh_BT2D.dtype))
        elif cfg.injection == "add":
            x_BTD = h_BTD + e_BTD
        else:
            x_BTD = h_BTD
        extras = []
        for i, block in enumerate(self.blocks):
            x_BTD, extra = run_block(i, block, x_BTD)
            extras.append(extra)
            if self.post_norm is not None:
                x_BTD = self.post_norm(x_BTD, s)
        if self.iter_norm is not None:
            x_BTD = self.iter_norm(x_BTD, s)
        return constrain(x_BTD, ("batch", "seq", "embed")), extras

    # ------------------------------------------------------------------- loop
    def _step(self, carry: LoopCarry, t, mode: str, ctx: dict) -> tuple[LoopCarry, StepOut]:
        """One scan step in mode skip | frozen | run; the same code for both drivers."""
        scoring: Scoring | None = ctx["scoring"]
        if mode == "skip":  # t >= n: the carry passes through; outputs keep their shapes
            zero = jnp.zeros((), f32(self.dtype)) if scoring is not None or ctx["gate"] is not None else None
            h_BTD = carry.h_BTD if ctx["halt"] is None else halting.output(_halt_of(carry.state), carry.h_BTD)
            return carry, StepOut(h_BTD if ctx["keep_latents"] else None, zero, zero)
        if mode == "frozen":  # t < n - k: forward only
            return jax.lax.stop_gradient(self._step(carry, t, "run", ctx))
        if ctx["halt"] is not None:
            return self._halting_step(carry, t, ctx) if ctx["gate"] is None else self._halting_gate_step(carry, t, ctx)
        if ctx["gate"] is not None:
            return self._gate_step(carry, t, ctx)
        h_BTD = self.iteration(
            carry.h_BTD, ctx["e_BTD"], self.slot(t), ctx["positions"], ctx["segments"], ctx["policy"]
        )
        objective, z_term, ce, acc = carry.objective, carry.z_term, None, None
        if scoring is not None:
            sc = scoring.score(h_BTD)
            objective = objective + scoring.w_S[t] * (sc.ce + scoring.z_loss * sc.z)
            z_term = z_term + scoring.w_S[t] * scoring.z_loss * sc.z
            ce, acc = sc.ce, sc.acc
        out = StepOut(h_BTD if ctx["keep_latents"] else None, ce, acc)
        return LoopCarry(h_BTD, objective, z_term, carry.state), out

    def _halting_step(self, carry: LoopCarry, t, ctx: dict) -> tuple[LoopCarry, StepOut]:
        """One step under per-token halting (asura.model.halting): every token runs iteration t,
        the active ones keep it, then the exit rule drops tokens."""
        spec, halt = ctx["halt"], carry.state
        args = (carry.h_BTD, ctx["e_BTD"], self.slot(t), ctx["positions"], ctx["segments"])
        if spec.kv == "copy":
            h_new, kv = self.iteration_copy(*args, halt, ctx["policy"])
        else:
            h_new, kv = self.iteration(*args, ctx["policy"]), None
        h_BTD, halt = halting.advance(spec, halt, carry.h_BTD, h_new, self, t, kv)
        out = StepOut(halting.output(halt, h_BTD) if ctx["keep_latents"] else None, None, None)
        return LoopCarry(h_BTD, carry.objective, carry.z_term, halt), out

    def _gate_step(self, carry: LoopCarry, t, ctx: dict) -> tuple[LoopCarry, StepOut]:
        """One step under the exit gate's loss: iteration t, each token's exit probability p_t, and
        p_t-weighted CE, z-loss and entropy added to the carry."""
        h_BTD = self.iteration(
            carry.h_BTD, ctx["e_BTD"], self.slot(t), ctx["positions"], ctx["segments"], ctx["policy"]
        )
        objective, z_term, state, out = self._gate_terms(carry, carry.state, h_BTD, t, ctx)
        return LoopCarry(h_BTD, objective, z_term, state), out

    def _gate_terms(self, carry: LoopCarry, gs: GateState, h_BTD, t, ctx: dict):
        """(objective, z_term, GateState, StepOut) after iteration t's latents h_BTD (the gate's loss)."""
        gate: GateScoring = ctx["gate"]
        tok = gate.tokens(h_BTD)
        logit_BT = self.exit_logit(h_BTD, gate_only=gate.improvement is not None)  # stage II: the gate alone
        p_BT, survival_BT = exit_distribution(jax.nn.sigmoid(logit_BT), gs.survival_BT, t == gate.n - 1)
        mask = gate.mask_BT
        z_step = gate.z_loss * masked_mean(p_BT * tok.z, mask)
        z_term = carry.z_term + z_step
        entropy = gs.entropy + masked_mean(entropy_terms(p_BT), mask)
        depth = gs.depth + masked_mean(p_BT * (t + 1), mask)
        out = StepOut(h_BTD if ctx["keep_latents"] else None, masked_mean(tok.ce, mask), masked_mean(tok.acc, mask))
        if gate.improvement is None:
            objective = carry.objective + masked_mean(p_BT * tok.ce, mask) + z_step
            return objective, z_term, GateState(survival_BT, entropy, depth, gs.ce_BT, gs.logit_BT), out
        # Ouro's stage II: iteration t labels the previous decision λ_{t-1} ("continue" when t improved
        # the token's CE by more than γ); the n − 1 decisions are averaged (the last exit is forced)
        k, gamma = gate.improvement
        ce_BT = jax.lax.stop_gradient(tok.ce)
        cont_BT = jax.nn.sigmoid(k * (jnp.maximum(gs.ce_BT - ce_BT, 0.0) - gamma))
        bce_BT = -(cont_BT * jax.nn.log_sigmoid(-gs.logit_BT) + (1.0 - cont_BT) * jax.nn.log_sigmoid(gs.logit_BT))
        decided = jnp.where(t > 0, masked_mean(bce_BT, mask), 0.0) / jnp.maximum(gate.n - 1, 1)
        return carry.objective + decided, z_term, GateState(survival_BT, entropy, depth, ce_BT, logit_BT), out

    def _halting_gate_step(self, carry: LoopCarry, t, ctx: dict) -> tuple[LoopCarry, StepOut]:
        """Halting and the gate's loss at once (depth.halt_gate_loss): iteration t under the exit rule
        (an exited token keeps its latent, and offers its copied keys/values under kv=copy), then the
        gate's terms on every token's latent, so the gate learns where to stop in the world its exits
        make. The loop runs all n steps (run_loop): an exited token's p_t then falls on its exit latent."""
        hg: HaltGate = carry.state
        stepped, _ = self._halting_step(LoopCarry(carry.h_BTD, carry.objective, carry.z_term, hg.halt), t, ctx)
        h_out = halting.output(stepped.state, stepped.h_BTD)
        objective, z_term, gs, out = self._gate_terms(carry, hg.gate, h_out, t, ctx)
        return LoopCarry(stepped.h_BTD, objective, z_term, HaltGate(stepped.state, gs)), out

    def run_loop(
        self,
        tokens_BT,
        n,
        *,
        positions_BT=None,
        segment_ids_BT=None,
        max_depth: int | None = None,
        unroll: bool = False,
        scoring: Scoring | None = None,
        keep_latents: bool = False,
        bptt_k=0,
        halt: halting.HaltSpec | None = None,
        gate: GateScoring | None = None,
    ) -> LoopResult:
        """Run the depth loop for depth n (int or traced) and return a LoopResult.

        halt: per-token halting (asura.model.halting); LoopResult.depth_BT counts each token's
        iterations. Forward and backward run only while some token is active."""
        if unroll and not isinstance(n, int | np.integer):
            raise ValueError("unroll=True needs a static python int depth n")
        if halt is not None and scoring is not None:
            raise ValueError("halting scores each token at its exit; latent guidance does not apply")
        if halt is not None and halt.entry.needs_gate and not self.cfg.exit_gate:
            raise ValueError(f"exit rule {halt.rule!r} reads the learned exit gate: train with model.exit_gate=true")
        S = self.scan_len(n, max_depth)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = default_positions(segment_ids_BT, B, T)
        e_BTD = constrain(self.embed[...][tokens_BT].astype(self.dtype), ("batch", "seq", "embed"))
        n_arr, valid = depth_index(n, S)
        if scoring is not None and not unroll:  # never keep B×T×V logits for the backward pass
            scoring = Scoring(jax.checkpoint(scoring.score, prevent_cse=False), scoring.w_S, scoring.z_loss)
        if gate is not None and not unroll:
            gate = dataclasses.replace(gate, tokens=jax.checkpoint(gate.tokens, prevent_cse=False))
        ctx = {
            "e_BTD": e_BTD,
            "positions": positions_BT,
            "segments": segment_ids_BT,
            "policy": "none" if unroll else self.cfg.remat,
            "scoring": scoring,
            "keep_latents": keep_latents,
            "halt": halt,
            "gate": gate,
        }
        zero = jnp.zeros((), f32(self.dtype))
        h0_BTD = self.h0(e_BTD)
        state, cont = (), None
        if gate is not None:
            ones_BT = jnp.ones((B, T), f32(self.dtype))
            state = GateState(ones_BT, zero, zero, jnp.zeros_like(ones_BT), jnp.zeros_like(ones_BT))
        if halt is not None:
            kv_shape = (self.cfg.n_layers, B, T, self.cfg.kv_heads, self.cfg.d_head)
            real_BT = None if segment_ids_BT is None else segment_ids_BT != 0  # padding never iterates
            halt_state = halting.init(halt, h0_BTD, self.cfg.vocab_size, kv_shape, self.dtype, real_BT)
            # with the gate's loss every step runs: its exit distribution spans all n iterations
            state, cont = (halt_state, self._live) if gate is None else (HaltGate(halt_state, state), None)
        carry = LoopCarry(h0_BTD, zero, zero, state)
        no_bptt = isinstance(bptt_k, int) and bptt_k <= 0
        if unroll:
            carry, ys = self._unrolled(carry, S, n, bptt_k, no_bptt, ctx)
        elif self.cfg.loop == "while":  # steps t >= n cost nothing, forward or backward
            lo = 0 if no_bptt else jnp.where(bptt_k > 0, jnp.maximum(n_arr - bptt_k, 0), 0)
            carry, ys = dynamic_loop(
                lambda c, t: self._step(c, t, "run", ctx),
                lambda c: self._step(c, jnp.int32(0), "skip", ctx)[1],
                carry, n_arr, S, remat.POLICIES[ctx["policy"]].store, lo, cont,
            )  # fmt: skip
        else:
            modes = ("skip", "run") if no_bptt else ("skip", "frozen", "run")
            branches = [lambda c, t, m=m: self._step(c, t, m, ctx) for m in modes]

            def body(c, t):
                live = t < n_arr if cont is None else (t < n_arr) & cont(c)
                if no_bptt:
                    idx = live.astype(jnp.int32)
                else:
                    idx = jnp.where(~live, 0, jnp.where(frozen(t, n_arr, bptt_k), 1, 2))
                return jax.lax.switch(idx, branches, c, t)

            carry, ys = remat.scan_iterations(body, carry, S, ctx["policy"])
        h_BTD, depth_BT = carry.h_BTD, None
        if halt is not None:
            hs = _halt_of(carry.state)
            h_BTD, depth_BT = halting.output(hs, carry.h_BTD), hs.depth_BT
        res = LoopResult(h_BTD, carry.objective, carry.z_term, ys.ce, ys.acc, ys.h_BTD, S, n_arr, depth_BT, carry.state)
        if valid is None:
            return res
        # a traced depth outside 1..S: NaN everywhere rather than the clamped depth's values
        outputs = ("h_BTD", "objective", "z_term", "ce_S", "acc_S", "h_SBTD")
        return res._replace(**{k: poison(getattr(res, k), valid) for k in outputs})

    @staticmethod
    def _live(carry: LoopCarry) -> jax.Array:
        """Under halting the loop goes on while some token is active (and t < n)."""
        return halting.any_active(_halt_of(carry.state))

    def _unrolled(self, carry: LoopCarry, S: int, n: int, bptt_k, no_bptt: bool, ctx: dict):
        """Reference driver: a Python loop over the same `_step` (static n). Under halting it runs
        every t < n: a step with no active token changes no output (kv=copy: nothing at all; kv=full:
        only the latent that no one reads), which is what the drivers' early stop assumes."""
        steps = []
        for t in range(S):
            if t >= n:
                mode = "skip"
            elif no_bptt:
                mode = "run"
            else:
                fr = frozen(t, n, bptt_k)
                if not isinstance(fr, bool):  # traced k: select the stop_gradient'ed values
                    out = self._step(carry, t, "run", ctx)
                    carry, ys = jax.tree.map(lambda x, f=fr: jnp.where(f, jax.lax.stop_gradient(x), x), out)
                    steps.append(ys)
                    continue
                mode = "frozen" if fr else "run"  # static k: drop the frozen step's backward from the graph
            carry, ys = self._step(carry, t, mode, ctx)
            steps.append(ys)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *steps)

    # -------------------------------------------------------------------- API
    def __call__(self, tokens_BT, n=None, positions_BT=None, segment_ids_BT=None, max_depth=None, unroll=False):
        """Final iteration's logits [B, T, V] in fp32."""
        n = self.cfg.iterations if n is None else n
        kw = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, max_depth=max_depth, unroll=unroll)
        return self.head(self.run_loop(tokens_BT, n, **kw).h_BTD)

    def latents(self, tokens_BT, n=None, positions_BT=None, segment_ids_BT=None, max_depth=None, unroll=False):
        """h_SBTD: every step's latent h_t (before the final norm). Steps t >= n
        repeat h_{n-1} (the carry passes through skipped steps)."""
        n = self.cfg.iterations if n is None else n
        kw = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, max_depth=max_depth, unroll=unroll)
        return self.run_loop(tokens_BT, n, keep_latents=True, **kw).h_SBTD

    def loss(self, batch, n=None, bptt_k=0, max_depth=None, unroll=False, with_pred=False, halt=None, gate_loss=False):
        """(objective, aux): the guidance-weighted masked-mean CE over iterations + z-loss.

        aux: ce (the final iteration's CE), ce_per_iter [S] (NaN where a step did not run or,
        with guidance='none', was not scored), z_loss, accuracy, tokens; with_pred adds
        pred [B, T] = argmax of the final logits from the same loop (evaluation needs one pass).
        halt (asura.model.halting.HaltSpec): each token is scored at its exit (no guidance), and
        aux adds depth_BT, the iterations each token ran. gate_loss (with halt, model.exit_gate): the
        objective is the gate's own loss computed on the halting forward (every step runs; an exited
        token's latent, and under kv=copy its keys/values, stay at its exit), so the gate keeps learning
        while the model learns to read what exited tokens offer; ce is still each token's CE at its exit.
        """
        cfg = self.cfg
        n = cfg.iterations if n is None else n
        targets_BT = batch["targets"]
        mask_BT = batch["loss_mask"].astype(f32(self.dtype))
        w_DV = self.w_DV()

        def score(h_BTD) -> Score:
            return scores(self.final_norm(h_BTD), w_DV, targets_BT, mask_BT, cfg.ce_chunk)

        kw = dict(
            positions_BT=batch.get("positions"),
            segment_ids_BT=batch.get("segment_ids"),
            max_depth=max_depth,
            unroll=unroll,
            bptt_k=bptt_k,
        )
        S = self.scan_len(n, max_depth)
        n_arr, _ = depth_index(n, S)  # run_loop's outputs are already NaN for a traced n out of range
        t_S = jnp.arange(S)
        if gate_loss and (halt is None or not cfg.exit_gate):
            raise ValueError("gate_loss trains the exit gate under halting: it needs halt and model.exit_gate")
        gated = cfg.exit_gate and (halt is None or gate_loss)
        if gated:
            # Ouro's objective: the expected loss over each token's exit distribution, minus β·H(p)
            tokens = lambda h_BTD: token_scores(self.final_norm(h_BTD), w_DV, targets_BT, cfg.ce_chunk)
            improvement = (cfg.exit_gate_k, cfg.exit_gate_gamma) if cfg.exit_gate_loss == "improvement" else None
            gate = GateScoring(tokens, mask_BT, n_arr, cfg.z_loss, improvement)
            res = self.run_loop(batch["inputs"], n, gate=gate, halt=halt, **kw)
            gs = res.state if halt is None else res.state.gate
            objective, z_term = res.objective - cfg.exit_entropy * gs.entropy, res.z_term
            if halt is None:
                ce, acc = res.ce_S[n_arr - 1], res.acc_S[n_arr - 1]
                ce_S = jnp.where(t_S < n_arr, res.ce_S, jnp.nan)
            else:  # each token at its own exit, as under halting without the gate's loss
                sc = score(res.h_BTD)
                ce, acc, ce_S = sc.ce, sc.acc, jnp.full((S,), jnp.nan, sc.ce.dtype)
        elif cfg.guidance == "none" or halt is not None:
            res = self.run_loop(batch["inputs"], n, halt=halt, **kw)
            sc = score(res.h_BTD)
            z_term = cfg.z_loss * sc.z
            objective, ce, acc = sc.ce + z_term, sc.ce, sc.acc
            # under halting no one iteration's CE is measured: each token is scored at its own exit
            ce_S = jnp.where((t_S == n_arr - 1) & (halt is None), ce, jnp.nan)
        else:
            w_S = guidance_weights(cfg, n_arr, S, self.slot)
            res = self.run_loop(batch["inputs"], n, scoring=Scoring(score, w_S, cfg.z_loss), **kw)
            objective, z_term = res.objective, res.z_term
            ce, acc = res.ce_S[n_arr - 1], res.acc_S[n_arr - 1]
            ce_S = jnp.where(t_S < n_arr, res.ce_S, jnp.nan)
        aux = {"ce": ce, "ce_per_iter": ce_S, "z_loss": z_term, "accuracy": acc, "tokens": mask_BT.sum()}
        if halt is not None:
            aux["depth_BT"] = res.depth_BT
        if gated:  # token means, as every train metric: the gate's exit entropy and expected depth
            aux["exit_entropy"], aux["exit_depth"] = gs.entropy, gs.depth
        if with_pred:  # the carry's latent is the final iteration's (skipped steps pass it through)
            aux["pred"] = jnp.argmax(self.head(res.h_BTD), axis=-1).astype(jnp.int32)
        return objective, aux
