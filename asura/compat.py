"""Version shims, in one place: flax, optax and orbax APIs that moved between the releases we support.

Supported ranges are pinned in pyproject.toml (jax 0.11.2 on the GPU image .. 0.12 here).
Each shim says which versions need which branch, so it can be deleted once the old side
drops out of the range.
"""

from __future__ import annotations

import contextlib
from typing import Any


def nnx_list(items: list) -> Any:
    """A list of submodules: nnx.List on flax >= 0.12 (plain lists of modules are deprecated there)."""
    from flax import nnx

    return getattr(nnx, "List", list)(items)


def no_eager_sharding():
    """Params carry sharding *metadata* only; newer flax shards a Variable on creation when it has
    `out_sharding` metadata, which fails without a mesh. Switch that off where it exists."""
    from flax import nnx

    ctx = getattr(nnx, "use_eager_sharding", None)
    return ctx(False) if ctx is not None else contextlib.nullcontext()


def nnx_merge(graphdef, params, rest):
    """nnx.merge with a pure param dict (works inside jit); older flax wants an nnx.State."""
    from flax import nnx

    try:
        return nnx.merge(graphdef, params, rest)
    except (TypeError, ValueError):
        return nnx.merge(graphdef, nnx.State(params), rest)


def variable_axes(var) -> tuple[str | None, ...] | None:
    """Logical axis names carried by an nnx.Variable (the metadata field was renamed across flax versions)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def tree_norm(tree):
    """Global L2 norm: optax.tree.norm on optax >= 0.2.5 (global_norm is deprecated there)."""
    import optax

    norm = getattr(getattr(optax, "tree", None), "norm", None)
    return norm(tree) if norm is not None else optax.global_norm(tree)


def orbax_preservation(latest_n: int, best_metric: str):
    """Keep the latest N steps plus the best one by `best_metric` (lower is better); None on older
    orbax without preservation policies (the caller falls back to max_to_keep)."""
    try:
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    except ImportError:
        return None
    best = pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1, keep_checkpoints_without_metrics=False)
    return pp.AnyPreservationPolicy([pp.LatestN(latest_n), best])


def empty(shape, dtype, sharding=None):
    """An uninitialised buffer: jax.lax.empty lowers to AllocateBuffer on GPU/TPU (no fill) and to
    zeros on CPU; zeros where a jax release lacks it."""
    import jax
    import jax.numpy as jnp

    fn = getattr(jax.lax, "empty", None)
    if fn is not None:
        return fn(tuple(shape), dtype, out_sharding=sharding)
    return jnp.zeros(shape, dtype, out_sharding=sharding) if sharding is not None else jnp.zeros(shape, dtype)
