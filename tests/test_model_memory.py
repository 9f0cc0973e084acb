"""Remat policies: identical loss and gradients, and less temp memory
(XLA's compiled.memory_analysis on CPU) for iteration / sqrt than none."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import build

from asura.config.schema import ModelConfig
from asura.model.remat import POLICIES

B, T, V = 4, 32, 32
CFG = ModelConfig(
    vocab_size=V, d_model=32, n_heads=2, n_layers=1, iterations=4, max_iterations=4, guidance="linear",
    adapter="none", qk_norm=False, z_loss=1e-3,
)  # fmt: skip


def compiled_grad_step(cfg, state, graphdef, batch):
    def loss_fn(s, n):
        return nnx.merge(graphdef, s).loss(batch, n=n)[0]

    return jax.jit(jax.value_and_grad(loss_fn)).lower(state, jnp.int32(1)).compile()


def temp_bytes(compiled):
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("memory_analysis unavailable on this backend")
    return mem.temp_size_in_bytes


def test_remat_policies_same_grads_less_memory():
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }
    temp, results = {}, {}
    for policy in POLICIES:
        graphdef, state = nnx.split(build(dataclasses.replace(CFG, remat=policy), 0))
        step = compiled_grad_step(CFG, state, graphdef, batch)
        temp[policy] = temp_bytes(step)
        results[policy] = [step(state, jnp.int32(n)) for n in (2, 4)]
    print("temp bytes at S=4:", temp)
    for policy in POLICIES[1:]:
        for (l1, g1), (l0, g0) in zip(results[policy], results["none"], strict=True):
            np.testing.assert_allclose(l1, l0, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp["iteration"] < temp["none"]
    assert temp["sqrt"] < temp["none"]
