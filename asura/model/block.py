"""One pre-norm decoder block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

The block's own pre-norms are shared across iterations; only adapters (inside
the linear maps) see the iteration slot `t`.
"""

from __future__ import annotations

import jax
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.layers import MLP, Attention, Norm
from asura.parallel.logical import constrain


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
