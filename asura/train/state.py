"""Train state as a plain pytree, built from the model in one place.

State layout (a dict, so orbax saves it as-is)::

    params     pure dict of arrays (the model's nnx.Param leaves)
    opt_state  optax state for `make_optimizer(cfg.train, axes)`
    step       int32: loop steps taken (advances on skipped steps too; drives data and depth)
    opt_step   int32: applied optimiser updates (drives the lr schedule)
    nan_streak int32: consecutive non-finite steps
    nan_total  int32: all skipped steps

`Built.axes` mirrors `params` with an `Axes` leaf per parameter: its logical axis names.
Placement (sharding) and the weight-decay rule read them, so neither builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.compat import nnx_merge, variable_axes
from asura.config import Config
from asura.train.optim import make_optimizer


@dataclass(frozen=True)
class Axes:
    """Logical axis names of one parameter (a pytree leaf, unlike a bare tuple)."""

    names: tuple[str | None, ...] | None


class Built(NamedTuple):
    graphdef: Any  # nnx graph definition of the model
    rest: Any  # non-param model state, held constant (not trained)
    state: dict  # arrays (init_state) or ShapeDtypeStructs (abstract_state)
    axes: dict  # params-shaped pytree of Axes


def build_model(cfg: Config):
    from asura.model import LoopedLM

    return LoopedLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))


def merge_model(graphdef, params, rest):
    """Rebuild the module from a pure param dict (works inside jit)."""
    return nnx_merge(graphdef, params, rest)


def _param_axes(params: nnx.State) -> dict:
    tree: dict = {}
    for path, var in nnx.to_flat_state(params):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = Axes(variable_axes(var))
    return tree


def _init(cfg: Config, out: dict) -> dict:
    graphdef, params, rest = nnx.split(build_model(cfg), nnx.Param, ...)
    out.update(graphdef=graphdef, rest=rest, axes=_param_axes(params))
    params = nnx.to_pure_dict(params)
    return {
        "params": params,
        "opt_state": make_optimizer(cfg.train, out["axes"]).init(params),
        "step": jnp.zeros((), jnp.int32),
        "opt_step": jnp.zeros((), jnp.int32),
        "nan_streak": jnp.zeros((), jnp.int32),
        "nan_total": jnp.zeros((), jnp.int32),
    }


def init_state(cfg: Config) -> Built:
    out: dict = {}
    state = _init(cfg, out)
    return Built(out["graphdef"], out["rest"], state, out["axes"])


def abstract_state(cfg: Config) -> Built:
    """Like init_state, but the state holds ShapeDtypeStructs (no allocation): restore targets."""
    out: dict = {}
    shapes = jax.eval_shape(lambda: _init(cfg, out))
    return Built(out["graphdef"], out["rest"], shapes, out["axes"])


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
