"""Which of a loop step's VJP residuals need a row per step (asura.model.dynamic_loop, store=residuals).

``jax.vjp`` of one step keeps every value its backward reads. Stored naively, each gets an S-row
buffer, but many are the same at every step or are free to recompute:

const  does not depend on the carry or the step index: the shared weights (block weights are the
       inputs of each checkpointed block under remat=block: 38% of a step's residual bytes in
       bench/skip_cost.py's d-256 model), their dtype casts, attention masks. Computed once, outside the loop.
view   a reshape/squeeze/broadcast of another residual that is stored (x and its 2-D form for a
       matmul, asura.model.layers.dense), or the same value listed twice. Rebuilt from it.
row    everything else: one buffer row per executed step.

Found from the step's jaxpr by dependence on the carry and step-index inputs, conservatively: a
value computed inside a nested call from anything that varies counts as varying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from jax.extend.core import Literal

# Primitives whose output is its one array operand rearranged without arithmetic: cheaper to redo
# in the backward than to store, fill and read back per step.
VIEWS = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim"})
# Call-like primitives (names across jax 0.11-0.12) whose nested jaxpr maps inputs to outputs once.
CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "custom_jvp_call",
                   "custom_vjp_call", "custom_vjp_call_jaxpr"})  # fmt: skip


@dataclass(frozen=True)
class Leaf:
    kind: str  # "row" | "const" | "view"
    source: int = -1  # view: the index of the leaf it is rebuilt from (a row)
    rebuild: Callable | None = None  # view: source value -> this leaf


@dataclass(frozen=True)
class ResidualPlan:
    leaves: tuple[Leaf, ...]
    avals: tuple  # every residual's abstract value, shardings included, in leaf order
    treedef: Any  # the residuals' pytree structure (jax.vjp's Partial), to rebuild the pullback

    def indices(self, kind: str) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves) if leaf.kind == kind]

    def assemble(self, rows: list, consts: list) -> list:
        """All leaves, in order, from the stored rows and the consts (as `indices` orders them)."""
        out: list = [None] * len(self.leaves)
        for i, v in zip(self.indices("row"), rows, strict=True):
            out[i] = v
        for i, v in zip(self.indices("const"), consts, strict=True):
            out[i] = v
        for i in self.indices("view"):
            leaf = self.leaves[i]
            out[i] = leaf.rebuild(out[leaf.source])
        return out


def plan(residuals_fn: Callable, carry, t, consts) -> ResidualPlan:
    """Classify the leaves of ``residuals_fn(carry, t, consts)`` (a pytree of arrays, e.g. a
    pullback) by what they depend on: carry and t vary per step, consts do not. One trace."""
    closed, shapes = jax.make_jaxpr(residuals_fn, return_shape=True)(carry, t, consts)
    jaxpr = closed.jaxpr
    n_varying = len(jax.tree.leaves(carry)) + 1  # flattened (carry, t, consts): carry and t come first
    flags = [i < n_varying for i in range(len(jaxpr.invars))]
    varying = _varying_vars(jaxpr, flags)
    producer = {o: eqn for eqn in jaxpr.eqns for o in eqn.outvars}
    outs = {v for v in jaxpr.outvars if not isinstance(v, Literal) and v in varying}

    def root(v):
        """(the residual v is a view of, and how to rebuild v from it); (v, identity) for a row."""
        src = _view_source(producer.get(v))
        if src is None or src not in outs:
            return v, lambda x: x
        r, inner = root(src)
        outer = _rebind(producer[v])
        return r, lambda x: outer(inner(x))

    out: list[Leaf] = []
    row_of: dict = {}  # var -> index of its row leaf
    for i, v in enumerate(jaxpr.outvars):  # rows first, so a view may come before its source
        if not isinstance(v, Literal) and v in outs and root(v)[0] is v and v not in row_of:
            row_of[v] = i
    for i, v in enumerate(jaxpr.outvars):
        if isinstance(v, Literal) or v not in outs:
            out.append(Leaf("const"))
        elif row_of.get(v) == i:
            out.append(Leaf("row"))
        else:  # a view of a row, or a row listed twice
            r, rebuild = root(v)
            out.append(Leaf("view", row_of[r], rebuild))
    return ResidualPlan(tuple(out), tuple(closed.out_avals), jax.tree.structure(shapes))


def _varying_vars(jaxpr, varying_in: list[bool]) -> set:
    """The variables of `jaxpr` that depend on an input flagged varying. Nested jaxprs (jit,
    checkpoint, custom_jvp calls) are followed, so an output of a nested call that only reads
    invariant inputs stays invariant; anything else with a varying input is varying."""
    varying = {v for v, f in zip(jaxpr.invars, varying_in, strict=True) if f}
    for eqn in jaxpr.eqns:
        flags = [not isinstance(v, Literal) and v in varying for v in eqn.invars]
        if not any(flags):
            continue
        inner = _nested(eqn)
        if inner is None:
            varying.update(eqn.outvars)
            continue
        inner_varying = _varying_vars(inner, flags)
        varying.update(o for o, io in zip(eqn.outvars, inner.outvars, strict=True)
                       if not isinstance(io, Literal) and io in inner_varying)  # fmt: skip
    return varying


def _nested(eqn):
    """The jaxpr a call-like eqn runs with its own inputs and outputs one to one, else None.
    Loops and conds are opaque on purpose: a loop body's outputs are a fixpoint, not one pass."""
    if eqn.primitive.name not in CALLS:
        return None
    for p in eqn.params.values():
        j = getattr(p, "jaxpr", p)  # ClosedJaxpr -> Jaxpr (its constvars are invariant)
        if hasattr(j, "eqns") and len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars):
            return j
    return None


def _view_source(eqn):
    """The one array operand of a view eqn, else None."""
    if eqn is None or eqn.primitive.name not in VIEWS:
        return None
    arrays = [v for v in eqn.invars if not isinstance(v, Literal)]
    return arrays[0] if len(arrays) == 1 and len(eqn.invars) == 1 else None


def _rebind(eqn) -> Callable:
    prim, params = eqn.primitive, dict(eqn.params)
    return lambda x: prim.bind(x, **params)
