"""What the while driver stores per step under store=residuals (asura.model.residual_plan): only
residuals that vary per step get S rows; step-invariant ones (weights, masks) are kept once and
views (reshapes, a value listed twice) are rebuilt. Gradients through the plan are covered by
tests/test_model_loop_driver.py; here, what is stored."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model_parity import ALL_ON, build, make_batch

import asura.model.dynamic_loop as DL
from asura.model import residual_plan


def test_plan_classifies_consts_views_and_rows():
    W = jnp.ones((3, 5))
    mask = jnp.arange(5) > 1

    def leaves(c, t, consts):
        (w,) = consts
        h = jnp.tanh(c @ w) * t  # varies: a row
        _, m = jax.jit(lambda a, b: (a * 2, jnp.where(b, 1.0, 0.0)))(
            h, mask
        )  # m: const, from a call with a varying input
        return [w, h, h.reshape(5, 1), h, w.T * 2, m, jnp.sin(h)[None]]

    p = residual_plan.plan(leaves, jnp.ones(3), jnp.int32(1), [W])
    assert [leaf.kind for leaf in p.leaves] == ["const", "row", "view", "view", "const", "const", "row"]
    assert [leaf.source for leaf in p.leaves if leaf.kind == "view"] == [1, 1]
    # assembling rebuilds the views from the row
    h = jnp.arange(5.0)
    full = p.assemble([h, jnp.sin(h)[None]], [W, W.T * 2, mask * 1.0])
    np.testing.assert_array_equal(full[2], h.reshape(5, 1))
    np.testing.assert_array_equal(full[3], h)
    np.testing.assert_array_equal(full[0], W)


def test_a_view_listed_before_its_source_is_still_a_view():
    def leaves(c, t, consts):
        h = c * t
        return [h.reshape(1, 3), h]

    p = residual_plan.plan(leaves, jnp.ones(3), jnp.int32(1), [])
    assert [leaf.kind for leaf in p.leaves] == ["view", "row"]


def test_loops_inside_a_step_are_opaque():
    """A while loop's outputs are a fixpoint: an output that one pass of the body would leave
    invariant can vary after two. The plan must not look inside."""

    def leaves(c, t, consts):
        def body(s):
            i, a, b = s
            return i + 1, b, a + c.sum() * t  # a takes b's value, which varies after one pass

        _, a, _ = jax.lax.while_loop(lambda s: s[0] < 2, body, (0, jnp.float32(0), jnp.float32(0)))
        return [a]

    assert residual_plan.plan(leaves, jnp.ones(3), jnp.int32(1), []).leaves[0].kind == "row"


@pytest.mark.parametrize("remat", ["block", "none"])
def test_model_step_stores_no_weight_and_no_mask_per_step(remat, monkeypatch):
    """The looped model's stored rows: no shared weight (block weights are every checkpointed
    block's inputs), no boolean mask, and fewer bytes than the step's residuals."""
    cfg = dataclasses.replace(ALL_ON, adapter="none", remat=remat, loop="while")
    model = build(cfg, 0)
    graphdef, state = nnx.split(model)
    batch = make_batch(1, packed=True)
    seen = {}
    real = residual_plan.plan

    def spy(residuals_fn, carry, t, consts):
        p = real(residuals_fn, carry, t, consts)
        seen["avals"] = jax.tree.leaves(jax.eval_shape(residuals_fn, carry, t, consts))  # the pullback's leaves
        seen["plan"] = p
        return p

    monkeypatch.setattr(DL.residual_plan, "plan", spy)
    jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=jnp.int32(2))[0])).lower(state)
    avals, p = seen["avals"], seen["plan"]
    rows = [avals[i] for i in p.indices("row")]
    weight_shapes = {tuple(v.shape) for v in jax.tree.leaves(state) if v.ndim == 2}
    assert not [r.shape for r in rows if tuple(r.shape) in weight_shapes]
    assert not [r.shape for r in rows if r.dtype == jnp.bool_]
    nbytes = sum(a.size * a.dtype.itemsize for a in avals)
    assert sum(r.size * r.dtype.itemsize for r in rows) < nbytes
