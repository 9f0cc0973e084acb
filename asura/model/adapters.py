"""Per-iteration parameter relaxation of a shared linear map x @ W.

ABBA: ΔW[t] = γ · (U1 V1) ⊙ (U2 V2), with U_i [d_in, r_i], V_i [r_i, d_out]
(our x @ W layout; the paper's B_i A_i is (U_i V_i)ᵀ). Rank ≤ r1·r2, applied
through the Khatri–Rao identity without forming the d_in × d_out matrix:

    (U1 V1) ⊙ (U2 V2) = (U1 ⊙_r U2) (V1ᵀ ⊙_r V2ᵀ)ᵀ
    U_kr [d_in, r1·r2]:  U_kr[i, (a,b)] = U1[i,a] · U2[i,b]   (row-wise KR)
    V_kr [r1·r2, d_out]: V_kr[(a,b), o] = V1[a,o] · V2[b,o]   (column-wise KR)
    x @ ΔW = γ · (x @ U_kr) @ V_kr

Init: V1 = 0 so ΔW = 0 exactly, while U1, U2, V2 are random so that
∂L/∂V1 ∝ U1ᵀ(G ⊙ U2V2) ≠ 0 (zeroing both V's would leave every gradient dead).
U ~ N(0, 1/d_in), V2 ~ N(0, 1/r2) so U2V2 has O(1/sqrt(d_in)) entries, like a
fan-in-initialised weight. LoRA: ΔW[t] = γ · U V, U random, V = 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.adapter_registry import ADAPTERS
from asura.model.layers import dense, normal, param, take


class ABBA(nnx.Module):
    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs):
        M, r1, r2 = cfg.max_iterations, cfg.adapter_rank, cfg.adapter_rank2
        n_in, n_out = names
        self.gamma = cfg.adapter_gamma
        self.u1 = param(rngs, normal(1 / math.sqrt(d_in)), (M, d_in, r1), ("iteration", n_in, "rank"), cfg)
        self.u2 = param(rngs, normal(1 / math.sqrt(d_in)), (M, d_in, r2), ("iteration", n_in, "rank"), cfg)
        self.v1 = param(rngs, nnx.initializers.zeros, (M, r1, d_out), ("iteration", "rank", n_out), cfg)
        self.v2 = param(rngs, normal(1 / math.sqrt(r2)), (M, r2, d_out), ("iteration", "rank", n_out), cfg)

    def factors(self, t, dtype=jnp.float32):
        return [take(p, t).astype(dtype) for p in (self.u1, self.u2, self.v1, self.v2)]

    def __call__(self, x: jax.Array, t) -> jax.Array:
        u1, u2, v1, v2 = self.factors(t, x.dtype)
        d_in, r1 = u1.shape
        r2, d_out = v2.shape
        ukr = (u1[:, :, None] * u2[:, None, :]).reshape(d_in, r1 * r2)
        vkr = (v1[:, None, :] * v2[None, :, :]).reshape(r1 * r2, d_out)
        return self.gamma * dense(dense(x, ukr), vkr)

    def delta_w(self, t) -> jax.Array:
        """The materialised ΔW[t] [d_in, d_out]; for tests and analysis only."""
        u1, u2, v1, v2 = self.factors(t)
        return self.gamma * (u1 @ v1) * (u2 @ v2)


class LoRA(nnx.Module):
    def __init__(self, cfg: ModelConfig, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs):
        M, r = cfg.max_iterations, cfg.adapter_rank
        n_in, n_out = names
        self.gamma = cfg.adapter_gamma
        self.u = param(rngs, normal(1 / math.sqrt(d_in)), (M, d_in, r), ("iteration", n_in, "rank"), cfg)
        self.v = param(rngs, nnx.initializers.zeros, (M, r, d_out), ("iteration", "rank", n_out), cfg)

    def __call__(self, x: jax.Array, t) -> jax.Array:
        return self.gamma * dense(dense(x, take(self.u, t).astype(x.dtype)), take(self.v, t).astype(x.dtype))

    def delta_w(self, t) -> jax.Array:
        return self.gamma * take(self.u, t) @ take(self.v, t)


def make_adapter(cfg: ModelConfig, d_in: int, d_out: int, names, *, rngs: nnx.Rngs):
    """The adapter module of kind model.adapter (see asura.model.adapter_registry)."""
    import importlib

    module, cls = ADAPTERS[cfg.adapter].impl.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, d_in, d_out, names, rngs=rngs)
