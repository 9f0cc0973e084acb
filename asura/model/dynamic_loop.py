"""The depth loop with a traced trip count: steps t >= n cost nothing, forward or backward.

A ``lax.scan`` over S steps that skips t >= n with ``lax.switch`` still runs S steps: under
``remat=none`` each skipped step writes zero-filled residuals and runs a backward step, so a
program compiled for S = 16 and run at n = 2 took 2.09x the step time of one compiled for S = 2.
Here the forward is a ``lax.while_loop`` over t < n and a ``custom_vjp`` runs the backward as a
second while-loop over the executed steps only, in reverse. Buffers are still sized by S (one
program serves every n <= S), but nothing is computed for t >= n.

What the forward keeps for the backward is the remat policy's ``store``:

residuals  each step's VJP residuals (``jax.vjp``'s pullback is a pytree of arrays): no
           recomputation. ``remat=none``; also ``block``, whose checkpointed blocks make the
           residuals just the block inputs. Only residuals that vary per step get a row;
           weights, masks and reshaped copies are kept once or rebuilt (asura.model.residual_plan).
carries    the carry entering each step; the backward recomputes one step at a time
           (``remat=iteration``).
sqrt       the carry at every chunk boundary (chunk = ceil(sqrt(S))); the backward recomputes a
           chunk's carries, then steps back through it one recomputed step at a time (``sqrt``).

A stop condition ``cont(carry)`` (per-token halting: some token still active) ends the loop
before n; the trip count is recorded in the forward and the backward starts from it.

Truncated backprop: steps t < lo are frozen (no gradient into them or through them), so the
backward loop stops at lo (lo is counted from n, not from an earlier stop). Per-step outputs ys
have S rows; rows t >= the steps run hold ``skip_y(carry_out)``, what a skipped step emits in
the scanned loop.

Reverse mode only: a custom_vjp rules out ``jax.jvp``/``linearize`` and grad-of-grad through the
loop (``model.loop=scan``, or ``unroll=True`` in the model's loss, allows them).

``step`` and ``skip_y`` may close over traced values (module parameters, the embedding, the
batch); ``_hoist`` makes every one an explicit argument of the custom_vjp (floats so their
gradients flow; integers too, so that nothing traced is closed over when an enclosing
``jax.checkpoint`` retraces the backward).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from asura.model import residual_plan
from asura.native.uninitialised import empty

STORES = ("residuals", "carries", "sqrt")


def _explicit_mesh():
    """The context's abstract mesh when it has explicit axes (e.g. kernels.lowering's target mesh)."""
    m = jax.sharding.get_abstract_mesh()
    return m if not m.empty and m._any_axis_explicit else None


def _spec(x, ndim: int) -> tuple:
    sh = jax.typeof(x).sharding if isinstance(x, jax.Array) else getattr(x, "sharding", None)
    spec = tuple(getattr(sh, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _on_mesh(v):
    """Under an explicit mesh, put a row on the context mesh (same spec): values derived from
    unsharded inputs carry an empty mesh, and an update must match its buffer's sharding."""
    if _explicit_mesh() is None:
        return v
    return jax.sharding.reshard(v, jax.sharding.PartitionSpec(*_spec(v, jnp.ndim(v))))


def _set(buf, t, value):
    return jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, _on_mesh(v), t, 0), buf, value)


def _get(buf, t):
    return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, t, 0, keepdims=False), buf)


def _stack_like(tree, rows: int):
    """S-row buffers, uninitialised (GPU/TPU AllocateBuffer; on the CPU asura.native's handler where it
    builds): the rows of steps that never run are never read, and filling S rows of residuals would
    cost in proportion to S, not n."""

    def buf(s):
        sharding = None
        if _explicit_mesh() is not None:  # on the context mesh, rows unsharded
            sharding = jax.sharding.PartitionSpec(None, *_spec(s, len(s.shape)))
        return empty((rows, *s.shape), s.dtype, sharding)

    return jax.tree.map(buf, tree)


def _fill_skipped(ys, y_skip, n, S: int):
    """Rows t >= n of ys take the skipped step's output."""

    def pick(b, s):
        keep = (jnp.arange(S) < n).reshape((S,) + (1,) * jnp.ndim(s))
        return jnp.where(keep, b, jnp.asarray(s)[None])

    return jax.tree.map(pick, ys, y_skip)


@dataclasses.dataclass(frozen=True)
class Hoisted:
    """A function with the traced values it closes over made arguments (jax.closure_convert, but
    hoisting integer values too): ``fn(*args, consts=(floats, others))``."""

    fn: Callable
    floats: list  # inexact: they take cotangents
    others: list  # integer/bool (token ids, positions): no cotangent
    # fn's outputs as abstract values *with* their shardings (jax.eval_shape drops them under an
    # explicit mesh, and a buffer must match its rows' sharding)
    out_avals: object


def _hoist(fun: Callable, *args) -> Hoisted:
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    out_tree = jax.tree.structure(out_shape)
    # Concrete constants (numpy tables) stay in the jaxpr; tracers of the enclosing trace are hoisted.
    hoist = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    is_float = [h and jnp.issubdtype(c.dtype, jnp.inexact) for c, h in zip(closed.consts, hoist, strict=True)]

    def fn(*a, consts):
        floats, others = iter(consts[0]), iter(consts[1])
        cs = [(next(floats) if fl else next(others)) if h else c
              for c, h, fl in zip(closed.consts, hoist, is_float, strict=True)]  # fmt: skip
        # eval_jaxpr, not jaxpr_as_fun: the latter switches debug_nans off inside
        flat = jax.core.eval_jaxpr(closed.jaxpr, cs, *jax.tree.leaves(a))
        return jax.tree.unflatten(out_tree, flat)

    floats = [c for c, fl in zip(closed.consts, is_float, strict=True) if fl]
    others = [c for c, h, fl in zip(closed.consts, hoist, is_float, strict=True) if h and not fl]
    return Hoisted(fn, floats, others, jax.tree.unflatten(out_tree, closed.out_avals))


def _is_float0(x) -> bool:
    return x.dtype == jax.dtypes.float0


def _add_ct(a, b):
    """Cotangents add; an integer carry leaf (halting's flags and counts) has float0 ones, which do not."""
    return a if _is_float0(a) else a + b


def sqrt_chunk(S: int) -> int:
    return max(1, math.ceil(math.sqrt(S)))


def dynamic_loop(step: Callable, skip_y: Callable, carry, n, S: int, store: str, lo=0, cont: Callable | None = None):
    """Run ``carry, y_t = step(carry, t)`` for t = 0 .. n-1 (n traced, 1 <= n <= S), and while
    ``cont(carry)`` holds when given (a function of the carry alone).

    Returns (carry_out, ys) with ys stacked over S rows (rows t >= trips: ``skip_y(carry_out)``).
    Gradients flow through steps t >= lo only.
    """
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    if cont is not None:
        hc = _hoist(cont, carry)
        if hc.floats or hc.others:
            raise ValueError("dynamic_loop: cont must be a function of the carry alone (it closes over traced values)")
    t0 = jnp.int32(0)
    # Every traced value the step closes over becomes an argument of the custom_vjp: floats take
    # cotangents, integers (tokens, positions) take none. A custom_vjp that closes over a tracer
    # breaks under an enclosing jax.checkpoint (the tracer escapes its trace).
    hs = _hoist(step, carry, t0)
    hk = _hoist(skip_y, carry)
    fl, sfl = (hs.floats, hs.others), (hk.floats, hk.others)

    def f(c, t, fl_):
        return hs.fn(c, t, consts=fl_)

    def g(c, sfl_):
        return hk.fn(c, consts=sfl_)

    def vjp_at(c, t, fl_):
        """((carry, y), pullback) of step t; the pullback's second output: the float consts'."""
        return jax.vjp(lambda c_, p: f(c_, t, (p, fl_[1])), c, fl_[0])

    def pullback(c, t, fl_):
        return vjp_at(c, t, fl_)[1]

    def residuals(c, t, fl_):
        return jax.tree.leaves(pullback(c, t, fl_))

    y_aval = hs.out_avals[1]  # the step returns (carry, y)
    # The pullback is a pytree (jax.vjp's Partial): its leaves are the residuals, the same
    # structure at every t (traced). Only those that vary per step get S rows (residual_plan).
    if store == "residuals":
        res_plan = residual_plan.plan(pullback, carry, t0, fl)
        row_avals = [res_plan.avals[i] for i in res_plan.indices("row")]

    def forward(c0, fl_, sfl_, n, keep: str | None):
        """While-loop over t < n; keep: None (no backward coming) or the store."""
        ys0 = _stack_like(y_aval, S)
        kept0 = None
        if keep == "residuals":
            kept0 = _stack_like(row_avals, S)
        elif keep == "carries":
            kept0 = _stack_like(c0, S)
        elif keep == "sqrt":
            kept0 = _stack_like(c0, -(-S // sqrt_chunk(S)))

        def body(state):
            t, c, ys, kept = state
            if keep == "residuals":
                (c_next, y), pull = vjp_at(c, t, fl_)
                leaves = jax.tree.leaves(pull)
                kept = _set(kept, t, [leaves[i] for i in res_plan.indices("row")])
            else:
                if keep == "carries":
                    kept = _set(kept, t, c)
                elif keep == "sqrt":
                    C = sqrt_chunk(S)
                    kept = jax.lax.cond(t % C == 0, lambda k: _set(k, t // C, c), lambda k: k, kept)
                c_next, y = f(c, t, fl_)
            return t + 1, c_next, _set(ys, t, y), kept

        def go(s):
            return s[0] < n if cont is None else (s[0] < n) & cont(s[1])

        trips, c, ys, kept = jax.lax.while_loop(go, body, (t0, c0, ys0, kept0))
        if keep == "residuals":  # the step-invariant residuals, once (XLA drops the rest of this step)
            once = residuals(c0, t0, fl_) if res_plan.indices("const") else []
            if once and [(x.shape, x.dtype) for x in once] != [(a.shape, a.dtype) for a in res_plan.avals]:
                raise AssertionError("step residuals traced at t = 0 differ from the planned ones")
            kept = (kept, [once[i] for i in res_plan.indices("const")])
        return c, _fill_skipped(ys, g(c, sfl_), trips, S), kept, trips

    @jax.custom_vjp
    def loop(c0, fl_, sfl_, n, lo):
        c, ys, _, _ = forward(c0, fl_, sfl_, n, None)
        return c, ys

    def loop_fwd(c0, fl_, sfl_, n, lo):
        c, ys, kept, trips = forward(c0, fl_, sfl_, n, store)
        return (c, ys), (kept, c, fl_, sfl_, trips, lo)  # the backward runs over the steps that ran

    def step_back(pull, g_c, g_y, g_fl):
        d_c, d_fl = pull((g_c, g_y))
        return d_c, jax.tree.map(jnp.add, g_fl, d_fl)

    def loop_bwd(res, cts):
        kept, c_n, fl_, sfl_, n, lo = res  # n: the steps that ran (< the depth when cont stopped it)
        g_c, g_ys = cts
        # Rows t >= n came from skip_y(carry_n): their cotangent flows into carry_n.
        skipped = jnp.arange(S) >= n
        g_skip = jax.tree.map(
            lambda gy: jnp.sum(jnp.where(skipped.reshape((S,) + (1,) * (gy.ndim - 1)), gy, 0), axis=0), g_ys
        )
        _, skip_pull = jax.vjp(lambda c_, p: g(c_, (p, sfl_[1])), c_n, sfl_[0])
        d_c, g_sfl = skip_pull(g_skip)
        g_c = jax.tree.map(_add_ct, g_c, d_c)
        g_fl = jax.tree.map(jnp.zeros_like, fl_[0])

        if store in ("residuals", "carries"):

            def body(state):
                t, g_c, g_fl = state
                if store == "residuals":
                    rows, consts = kept
                    pull = jax.tree.unflatten(res_plan.treedef, res_plan.assemble(_get(rows, t), consts))
                else:
                    pull = pullback(_get(kept, t), t, fl_)
                g_c, g_fl = step_back(pull, g_c, _get(g_ys, t), g_fl)
                return t - 1, g_c, g_fl

            _, g_c, g_fl = jax.lax.while_loop(lambda s: s[0] >= lo, body, (n - 1, g_c, g_fl))
        else:
            C = sqrt_chunk(S)

            def chunk_body(state):
                k, g_c, g_fl = state
                start = k * C
                end = jnp.minimum(start + C, n)  # steps start .. end-1 ran

                def fill(s):  # recompute the chunk's carries from its boundary carry
                    i, c, local = s
                    return i + 1, f(c, start + i, fl_)[0], _set(local, i, c)

                local0 = _stack_like(c_n, C)
                _, _, local = jax.lax.while_loop(
                    lambda s: start + s[0] < end, fill, (jnp.int32(0), _get(kept, k), local0)
                )

                def inner(s):
                    t, g_c, g_fl = s
                    pull = pullback(_get(local, t - start), t, fl_)
                    g_c, g_fl = step_back(pull, g_c, _get(g_ys, t), g_fl)
                    return t - 1, g_c, g_fl

                first = jnp.maximum(start, lo)
                _, g_c, g_fl = jax.lax.while_loop(lambda s: s[0] >= first, inner, (end - 1, g_c, g_fl))
                return k - 1, g_c, g_fl

            _, g_c, g_fl = jax.lax.while_loop(lambda s: s[0] * C + C > lo, chunk_body, ((n - 1) // C, g_c, g_fl))
        # Frozen steps (t < lo) pass no gradient back to the initial carry.
        g_c = jax.tree.map(lambda x: x if _is_float0(x) else jnp.where(lo > 0, jnp.zeros_like(x), x), g_c)
        # integer consts, n and lo take no cotangent
        return g_c, (g_fl, [None] * len(fl_[1])), (g_sfl, [None] * len(sfl_[1])), None, None

    loop.defvjp(loop_fwd, loop_bwd)
    return loop(carry, fl, sfl, jnp.asarray(n, jnp.int32), jnp.asarray(lo, jnp.int32))
