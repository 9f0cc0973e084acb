"""The CPU train step moves no large array into another layout (issue #18).

XLA transposes an operand when its layout does not suit the consumer. Two such copies were a third
of the CPU step: the MLP weight gradient contracted (batch, seq) of a 3-D activation, so XLA
transposed the [B, T, F] cotangent (asura.model.layers.dense now flattens to 2-D), and the xla
attention's BTNH einsums transposed the [T, S] scores (it now puts heads first). Structural, not
timed: the compiled HLO is read with asura.hlo, and the largest array a transpose or
layout-changing copy moves must be no bigger than one [B, T, D] activation (the q/k/v/o transposes
into head-major order are that size, and cheap). The timed profile is bench/op_profile.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asura.config.schema import ModelConfig
from asura.hlo import parse
from asura.model.looped import LoopedLM

B, T, D, V = 2, 32, 64, 64


def batch():
    rng = np.random.default_rng(0)
    return {
        "inputs": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }


# ff_dim 4·D and n_heads·T > D: an [B, T, F] or [B, N, T, T] move is bigger than the bound.
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(remat="iteration"), id="iteration"),
        pytest.param(dict(remat="none"), id="none"),
        pytest.param(dict(remat="block", n_kv_heads=2, mlp="swiglu"), id="block-gqa-swiglu"),
        pytest.param(dict(remat="iteration", adapter="abba", ce_chunk=16), id="abba-chunked-ce"),
    ],
)
def test_train_step_moves_no_array_larger_than_an_activation(overrides):
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=2, iterations=3, max_iterations=3, n_heads=4,
                      guidance="linear", attention="xla", **overrides)  # fmt: skip
    graphdef, state = nnx.split(LoopedLM(cfg, rngs=nnx.Rngs(0)))
    data = batch()

    def loss(s):
        return nnx.merge(graphdef, s).loss(data, n=jnp.int32(3))[0]

    hlo = jax.jit(jax.value_and_grad(loss)).lower(state).compile().as_text()
    moves = parse(hlo).layout_moves()
    big = [(m.name, m.shape) for m in moves if m.elements > B * T * D]
    assert not big, f"layout moves larger than one [B, T, D] activation: {big}"


def test_parser_finds_transposes_and_ignores_size_one_axes():
    """The check above is only as good as the parser: a real transpose is found and sized, and
    moving a size-1 axis (a bitcast in disguise) is not a move."""
    x = jnp.ones((64, 32))
    moves = parse(jax.jit(lambda x: jnp.sin(x.T) * 2).lower(x).compile().as_text()).layout_moves()
    assert moves and {m.elements for m in moves} == {64 * 32}
    hlo = """
%fused (p: f32[8,1,4]) -> f32[8,1,4] {
  %p = f32[8,1,4]{2,1,0} parameter(0)
  %b = f32[8,1,4]{1,2,0} bitcast(%p)
  ROOT %c = f32[8,1,4]{2,1,0} copy(%b)
}
ENTRY %main (x: f32[8,1,4]) -> f32[8,1,4] {
  %x = f32[8,1,4]{2,1,0} parameter(0)
  ROOT %f = f32[8,1,4]{2,1,0} fusion(%x), kind=kLoop, calls=%fused
}"""
    assert parse(hlo).layout_moves() == []
    assert parse(hlo.replace("{1,2,0}", "{0,2,1}")).ops_moving_layout() == {"c", "f"}
