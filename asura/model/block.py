"""One pre-norm decoder block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

The block's own pre-norms are shared across iterations; only adapters (inside
the linear maps) see the iteration slot `t`.

`cached` is the same block with its attention supplied by the caller: asura.infer's KV
cache attends the new tokens' queries over cached keys/values and keeps this call's k/v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.layers import MLP, QKV, Attention, Norm
from asura.parallel.logical import constrain

Attend = Callable[[QKV], jax.Array]  # this call's projections -> attended values o_BTNH


class BlockOut(NamedTuple):
    x_BTD: jax.Array
    k_BTKH: jax.Array  # this call's keys (after qk-norm and RoPE) and values: what a KV cache keeps
    v_BTKH: jax.Array


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = Norm(cfg, cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = Norm(cfg, cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT, segment_ids_BT, t=None) -> jax.Array:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), positions_BT, segment_ids_BT, t)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        x_BTD = x_BTD + self.mlp(self.ln2(x_BTD), t)
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def cached(self, x_BTD: jax.Array, positions_BT, t, attend: Attend) -> BlockOut:
        """__call__ with attention over a KV cache: attend(QKV) -> o_BTNH (asura.infer)."""
        p = self.attn.qkv(self.ln1(x_BTD), positions_BT, t)
        x_BTD = x_BTD + self.attn.out(attend(p), t)
        x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
        x_BTD = x_BTD + self.mlp(self.ln2(x_BTD), t)
        return BlockOut(constrain(x_BTD, ("batch", "seq", "embed")), p.k_BTKH, p.v_BTKH)
