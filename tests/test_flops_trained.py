"""Trained parameters (asura.flops.param_count(cfg).trained) against the gradients of the real model.

The reference: perturb every parameter away from its initial values (so no product with a zero-
initialised factor, LoRA's B say, hides a used parameter), take the loss gradient at every depth
the training schedule can draw (with its truncated backprop), and count the parameter elements
whose gradient is nonzero at one depth at least. Tied embeddings, so every vocabulary row gets a
gradient through the head. An element used by training but with an exactly zero gradient would
need a cancellation of random fp32 values: probability ~0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from asura.data.synthetic import synthetic_batch
from asura.depth import depth_distribution
from asura.flops import param_count, trained_slots
from asura.model import LoopedLM

TRICKS = ("model.injection=projconcat", "model.iter_norm=true", "model.post_norm=true", "model.adapter=abba",
          "model.vocab_size=64", "model.tie_embeddings=true", "train.batch_size=2", "data.seq_len=16")  # fmt: skip
CASES = {
    # name: (overrides, trained slots)
    "fixed depth 3 of 4 slots": (("model.iterations=3", "model.max_iterations=4"), {0, 1, 2}),
    "uniform 1..4, bptt 1": (
        (
            "model.iterations=3",
            "model.max_iterations=4",
            "depth.schedule=uniform",
            "depth.min=1",
            "depth.max=4",
            "depth.bptt_k=1",
        ),
        {0, 1, 2, 3},
    ),
    "uniform 3..4, bptt 1": (
        (
            "model.iterations=3",
            "model.max_iterations=4",
            "depth.schedule=uniform",
            "depth.min=3",
            "depth.max=4",
            "depth.bptt_k=1",
        ),
        {2, 3},
    ),
    "past the slots, last": (
        (
            "model.iterations=3",
            "model.max_iterations=2",
            "model.extrapolation=last",
            "depth.schedule=uniform",
            "depth.min=3",
            "depth.max=4",
            "depth.bptt_k=1",
        ),
        {1},
    ),
    "past the slots, cycle": (
        (
            "model.iterations=3",
            "model.max_iterations=2",
            "model.extrapolation=cycle",
            "depth.schedule=uniform",
            "depth.min=3",
            "depth.max=4",
            "depth.bptt_k=1",
        ),
        {0, 1},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trained_params_are_those_with_gradients(name):
    overrides, slots = CASES[name]
    cfg = tiny_config(*TRICKS, *overrides)
    assert trained_slots(cfg) == slots
    model = LoopedLM(cfg.model, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    batch = synthetic_batch(cfg, 0)
    support = [n for n, p in depth_distribution(cfg).items() if p > 0]
    used = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)

    @jax.jit
    def grad(p, n):  # one program for every depth: n is traced, as in training
        return jax.grad(lambda p: nnx.merge(graph, p, rest).loss(batch, n=n, bptt_k=cfg.depth.bptt_k,
                                                               max_depth=max(support))[0])(p)  # fmt: skip

    for n in support:
        g = grad(params, jnp.int32(n))
        used = jax.tree.map(lambda u, x: u | (np.asarray(x) != 0), used, g)
    n_used = sum(int(u.sum()) for u in jax.tree.leaves(used))
    pc = param_count(cfg)
    assert n_used == pc.trained and pc.unique - pc.trained == pc.untrained
    assert (pc.untrained == 0) == (len(slots) == cfg.model.max_iterations)
