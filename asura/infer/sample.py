"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus). Traceable, fp32.

Order (as Hugging Face's generate): logits / temperature -> keep the top_k -> keep the smallest
prefix of the sorted distribution whose mass reaches top_p -> sample. The most likely token is
always kept, so a top token whose probability alone exceeds top_p gives greedy, never NaN.
temperature = 0 is greedy (argmax; top_k and top_p are then irrelevant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # refuses NaN too; inf would divide every logit to 0 or NaN
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits_BV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
    """One token per row [B] (int32) from logits [B, V]; row b draws with its own key keys_B[b],
    so a row's draw does not depend on the other rows of the batch."""
    logits_BV = logits_BV.astype(jnp.float32)
    if s.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda x_V, key: _sample_row(x_V, key, s))(logits_BV, keys_B)


def _sample_row(logits_V: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    x_V = logits_V / s.temperature
    V = x_V.shape[-1]
    k = min(s.top_k, V) if s.top_k else V
    if k == V and s.top_p >= 1:
        return jax.random.categorical(key, x_V).astype(jnp.int32)
    vals_K, idx_K = jax.lax.top_k(x_V, k)  # sorted, descending
    if s.top_p < 1:
        p_K = jax.nn.softmax(vals_K)
        before_K = jnp.cumsum(p_K) - p_K  # mass strictly above each token: exactly 0 for the top one
        vals_K = jnp.where(before_K < s.top_p, vals_K, -jnp.inf)
    return idx_K[jax.random.categorical(key, vals_K)].astype(jnp.int32)
