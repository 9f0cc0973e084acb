"""LoopedLM: one weight-shared stack of blocks applied n times (ASURA-style).

Data flow of one forward pass (tokens_BT, depth n):

    e_BTD = Emb(tokens)                    h_0 = e
    for t = 0 .. S-1   (S = scan length = depth_cap or max_iterations)
        if t >= n: skip (carry passes through unchanged)
        s = slot(t)                        per-iteration parameter index; t, or
                                           min(t, M-1) / t % M when extrapolating
        u = inject(e, h)                   concat(e, h) @ W_proj[s] | h + e | h
        x = u; for each shared block b:    x = b(x; adapters ΔW[s])
                                           x = PostLN[s](x)      (post_norm)
        h = LN_s(x)                        (iter_norm)
        loss += w_t · CE(head(h), y)       (latent guidance, streamed in the carry)
    logits = head(h_{n-1}) = FinalNorm(h) @ Wᵤ   (fp32)

n may be a traced int32: the loop is a lax.scan over S steps whose body picks
a branch with lax.switch (skip / frozen / run), so one compiled program serves
every n ≤ S. Truncated backprop (bptt_k = k > 0) runs steps t < n − k under
stop_gradient. `unroll=True` (static n) is the same maths as a Python loop
with no scan, cond or remat: the reference the scanned path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model import remat
from asura.model.block import Block
from asura.model.depth import frozen
from asura.model.layers import DTYPES, Norm, f32, normal, param
from asura.model.loss import guidance_weights, scores
from asura.parallel.logical import constrain

_List = getattr(nnx, "List", list)  # nnx.List on flax >= 0.12; plain lists before


def _projconcat_init(std: float):
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


class LoopedLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        remat.check(cfg.remat)
        self.cfg = cfg
        D, V, M = cfg.d_model, cfg.vocab_size, cfg.max_iterations
        self.embed = param(rngs, normal(cfg.init_std), (V, D), ("vocab", "embed"), cfg)
        self.blocks = _List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        proj_names = ("iteration", None, "embed")
        proj = cfg.injection == "projconcat"
        self.w_proj = param(rngs, _projconcat_init(cfg.init_std), (M, 2 * D, D), proj_names, cfg) if proj else None
        self.post_norm = Norm(cfg, D, rngs=rngs, stack=M) if cfg.post_norm else None
        self.iter_norm = Norm(cfg, D, rngs=rngs, stack=M) if cfg.iter_norm else None
        self.final_norm = Norm(cfg, D, rngs=rngs)
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
        logits_BTV = jnp.einsum(
            "btd,dv->btv", x_BTD, self.w_DV().astype(x_BTD.dtype), preferred_element_type=f32(x_BTD.dtype)
        )
        return constrain(logits_BTV, ("batch", "seq", "vocab"))

    def slot(self, t):
        """Per-iteration parameter index for loop step t (int or traced)."""
        M = self.cfg.max_iterations
        if self.cfg.extrapolation == "last":
            return jnp.minimum(t, M - 1)
        if self.cfg.extrapolation == "cycle":
            return t % M
        return t  # "none": scan_len guarantees t < M

    def scan_len(self, n, depth_cap=None) -> int:
        """Static number of loop steps S; checks n against max_iterations."""
        M = self.cfg.max_iterations
        static_n = int(n) if isinstance(n, int | np.integer) else None
        if static_n is not None and static_n < 1:
            raise ValueError(f"depth n must be >= 1, got {n}")
        S = int(depth_cap) if depth_cap is not None else max(M, static_n or 0)
        if static_n is not None and static_n > S:
            raise ValueError(f"depth n={static_n} exceeds depth_cap={S}")
        if S > M and self.cfg.extrapolation == "none":
            what = f"n={static_n}" if depth_cap is None else f"depth_cap={depth_cap}"
            raise ValueError(
                f"{what} exceeds model.max_iterations={M} and model.extrapolation='none'. "
                "Set model.extrapolation='last' (reuse the final iteration's parameters) or "
                "'cycle' (iteration t uses slot t % max_iterations), or raise max_iterations."
            )
        return S

    def iteration(self, h_BTD, e_BTD, s, positions_BT, segment_ids_BT, policy: str = "none"):
        """One loop step with per-iteration parameters at slot s: h_{t-1} -> h_t."""
        cfg = self.cfg
        if cfg.injection == "projconcat":
            eh_BT2D = jnp.concatenate([e_BTD, h_BTD], axis=-1)
            x_BTD = eh_BT2D @ self.w_proj[...][s].astype(eh_BT2D.dtype)
        elif cfg.injection == "add":
            x_BTD = h_BTD + e_BTD
        else:
            x_BTD = h_BTD
        for block in self.blocks:
            x_BTD = remat.wrap_block(lambda x, b=block: b(x, positions_BT, segment_ids_BT, s), policy)(x_BTD)
            if self.post_norm is not None:
                x_BTD = self.post_norm(x_BTD, s)
        if self.iter_norm is not None:
            x_BTD = self.iter_norm(x_BTD, s)
        return constrain(x_BTD, ("batch", "seq", "embed"))

    # ------------------------------------------------------------------- loop
    def _loop(
        self,
        tokens_BT,
        n,
        positions_BT,
        segment_ids_BT,
        depth_cap,
        unroll,
        *,
        score=None,
        w_S=None,
        latents=False,
        bptt_k=0,
    ):
        """Run the depth loop. Returns ((h_final, loss_sum, zterm_sum), ys, S, n_arr).

        score(h) -> (ce, z, acc) is streamed with weights w_S when given; ys holds
        per-step "ce"/"acc" (0 for t >= n) and, if `latents`, "h" (h_{n-1} repeated for t >= n).
        """
        cfg = self.cfg
        if unroll and not isinstance(n, int | np.integer):
            raise ValueError("unroll=True needs a static python int depth n")
        S = self.scan_len(n, depth_cap)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = default_positions(segment_ids_BT, B, T)
        e_BTD = constrain(self.embed[...][tokens_BT].astype(self.dtype), ("batch", "seq", "embed"))
        n_arr = jnp.clip(jnp.asarray(n, jnp.int32), 1, S)  # a traced n cannot be range-checked
        policy = "none" if unroll else cfg.remat
        zc = cfg.z_loss
        acc_dt = f32(self.dtype)
        if score is not None and not unroll:
            score = jax.checkpoint(score, prevent_cse=False)  # never keep B×T×V logits for backward

        def run(carry, t):
            h_BTD, loss_sum, z_sum = carry
            h_BTD = self.iteration(h_BTD, e_BTD, self.slot(t), positions_BT, segment_ids_BT, policy)
            ys = {"h": h_BTD} if latents else {}
            if score is not None:
                ce, z, acc = score(h_BTD)
                loss_sum = loss_sum + w_S[t] * (ce + zc * z)
                z_sum = z_sum + w_S[t] * zc * z
                ys.update(ce=ce, acc=acc)
            return (h_BTD, loss_sum, z_sum), ys

        def skip(carry, t):
            ys = {"h": carry[0]} if latents else {}
            if score is not None:
                ys.update(ce=jnp.zeros((), acc_dt), acc=jnp.zeros((), acc_dt))
            return carry, ys

        def frozen_run(carry, t):
            return jax.lax.stop_gradient(run(carry, t))

        carry = (e_BTD, jnp.zeros((), acc_dt), jnp.zeros((), acc_dt))
        no_bptt = isinstance(bptt_k, int) and bptt_k <= 0
        if unroll:
            steps = []
            for t in range(S):
                if t >= n:
                    carry, ys = skip(carry, t)
                elif no_bptt:
                    carry, ys = run(carry, t)
                else:
                    fr = frozen(t, n, bptt_k)
                    if isinstance(fr, bool):  # static k: drop the frozen step's backward from the graph
                        carry, ys = frozen_run(carry, t) if fr else run(carry, t)
                    else:
                        out = run(carry, t)
                        carry, ys = jax.tree.map(lambda x, f=fr: jnp.where(f, jax.lax.stop_gradient(x), x), out)
                steps.append(ys)
            ys = jax.tree.map(lambda *xs: jnp.stack(xs), *steps) if steps[0] else {}
            return carry, ys, S, n_arr

        branches = (skip, run) if no_bptt else (skip, frozen_run, run)

        def body(carry, t):
            if no_bptt:
                idx = (t < n_arr).astype(jnp.int32)
            else:
                idx = jnp.where(t >= n_arr, 0, jnp.where(frozen(t, n_arr, bptt_k), 1, 2))
            return jax.lax.switch(idx, branches, carry, t)

        carry, ys = remat.scan_iterations(body, carry, S, policy)
        return carry, ys, S, n_arr

    # -------------------------------------------------------------------- API
    def __call__(self, tokens_BT, n=None, positions_BT=None, segment_ids_BT=None, depth_cap=None, unroll=False):
        """Final iteration's logits [B, T, V] in fp32."""
        n = self.cfg.iterations if n is None else n
        (h_BTD, _, _), _, _, _ = self._loop(tokens_BT, n, positions_BT, segment_ids_BT, depth_cap, unroll)
        return self.head(h_BTD)

    def latents(self, tokens_BT, n=None, positions_BT=None, segment_ids_BT=None, depth_cap=None, unroll=False):
        """h_SBTD: every step's latent h_t (before the final norm). Steps t >= n
        repeat h_{n-1} (the carry passes through skipped steps)."""
        n = self.cfg.iterations if n is None else n
        _, ys, _, _ = self._loop(tokens_BT, n, positions_BT, segment_ids_BT, depth_cap, unroll, latents=True)
        return ys["h"]

    def loss(self, batch, n=None, bptt_k=0, depth_cap=None, unroll=False, with_pred=False):
        """Guidance-weighted masked-mean CE over iterations + z-loss; see module docstring.

        aux["ce_per_iter"] has S entries, 0 for t >= n. With guidance='none' only the
        final iteration is scored, so only entry n-1 is nonzero. with_pred adds
        aux["pred"] = argmax of the final iteration's logits [B, T] from the same loop,
        so evaluation needs one pass instead of loss + __call__.
        """
        cfg = self.cfg
        n = cfg.iterations if n is None else n
        targets_BT = batch["targets"]
        mask_BT = batch["loss_mask"].astype(f32(self.dtype))
        w_DV = self.w_DV()

        def score(h_BTD):
            return scores(self.final_norm(h_BTD), w_DV, targets_BT, mask_BT, cfg.ce_chunk)

        args = (batch["inputs"], n, batch.get("positions"), batch.get("segment_ids"), depth_cap, unroll)
        if cfg.guidance == "none":
            (h_BTD, _, _), _, S, n_arr = self._loop(*args, bptt_k=bptt_k)
            ce, z, acc = score(h_BTD)
            z_term = cfg.z_loss * z
            loss = ce + z_term
            ce_S = jnp.where(jnp.arange(S) == n_arr - 1, ce, 0.0)
        else:
            S = self.scan_len(n, depth_cap)
            w_S = guidance_weights(cfg, jnp.clip(jnp.asarray(n, jnp.int32), 1, S), S, self.slot)
            (h_BTD, loss, z_term), ys, S, n_arr = self._loop(*args, score=score, w_S=w_S, bptt_k=bptt_k)
            ce_S = ys["ce"]
            ce, acc = ce_S[n_arr - 1], ys["acc"][n_arr - 1]
        aux = {"ce": ce, "ce_per_iter": ce_S, "z_loss": z_term, "accuracy": acc, "tokens": mask_BT.sum()}
        if with_pred:  # the carry's latent is the final iteration's (skipped steps pass it through)
            aux["pred"] = jnp.argmax(self.head(h_BTD), axis=-1).astype(jnp.int32)
        return loss, aux
