"""Remat policies: identical loss, per-step outputs and gradients, and less temp memory
(XLA's compiled.memory_analysis on CPU) for iteration / sqrt than none."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import build

from asura.config.schema import ModelConfig
from asura.model.remat import POLICIES, sqrt_chunks

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
    # Remat recomputes the same fp32 ops; only their scheduling (and XLA's fusion) differs, so
    # results agree to a few ulps (2^-24) of the O(1) loss and of each gradient.
    for policy in [p for p in POLICIES if p != "none"]:
        for (l1, g1), (l0, g0) in zip(results[policy], results["none"], strict=True):
            np.testing.assert_allclose(l1, l0, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp["iteration"] < temp["none"]
    assert temp["sqrt"] < temp["none"]


SQRT_CFG = dataclasses.replace(
    CFG, iterations=3, max_iterations=3, extrapolation="cycle", guidance="linear", remat="none"
)  # M = 3 slots; depths up to S reuse them cyclically, so S > M is reachable


@pytest.mark.parametrize("S", [3, 5, 7, 10])
def test_sqrt_padding_per_step_outputs_and_grads_equal_none(S):
    """sqrt pads the S loop steps to n_chunks·chunk and returns the first S per-step outputs.

    S = 3, 5, 7, 10 pad to 4, 6, 9, 12 (none of them a square), so a wrong slice or a padded
    step that is not a pass-through shows up in ce_per_iter, the latents or the gradients.
    """
    n_chunks, chunk = sqrt_chunks(S)
    assert n_chunks * chunk > S  # the padded path is the one under test
    rng = np.random.default_rng(S)
    Bs, Ts = 2, 8
    batch = {
        "inputs": jnp.asarray(rng.integers(0, V, (Bs, Ts)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, V, (Bs, Ts)), jnp.int32),
        "loss_mask": jnp.asarray(rng.random((Bs, Ts)) > 0.2, jnp.float32),
    }
    out = {}
    for policy in ("none", "sqrt"):
        graphdef, state = nnx.split(build(dataclasses.replace(SQRT_CFG, remat=policy), 0))

        def loss_fn(s, n, graphdef=graphdef):
            return nnx.merge(graphdef, s).loss(batch, n=n, max_depth=S)

        @jax.jit
        def run(s, n, graphdef=graphdef, loss_fn=loss_fn):
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(s, n)
            h_SBTD = nnx.merge(graphdef, s).latents(batch["inputs"], n=n, max_depth=S)
            return loss, aux["ce_per_iter"], h_SBTD, grads

        out[policy] = [run(state, jnp.int32(n)) for n in (1, (S + 1) // 2, S)]
    # Same fp32 ops, scheduled differently (nested checkpointed scans): a few ulps apart.
    for (l1, ce1, h1, g1), (l0, ce0, h0, g0), n in zip(out["sqrt"], out["none"], (1, (S + 1) // 2, S), strict=True):
        assert ce1.shape == (S,) and h1.shape == (S, Bs, Ts, SQRT_CFG.d_model)
        np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=f"S={S} n={n}")
        np.testing.assert_allclose(ce1, ce0, rtol=1e-6, err_msg=f"S={S} n={n}")  # NaN past n in both
        assert np.isnan(np.asarray(ce1)[n:]).all() and np.isfinite(np.asarray(ce1)[:n]).all()
        np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-6, err_msg=f"S={S} n={n}")
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"S={S} n={n}")
