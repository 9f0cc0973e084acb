"""Train state as a plain pytree, and the ONE place that puts state and batches on devices.

State layout (a dict, so orbax saves it as-is)::

    params     pure dict of fp32 arrays (nnx.Param leaves of the model)
    opt_state  optax state for `make_optimizer(cfg.train)`
    step       int32: loop steps taken (advances on skipped steps too; drives data and depth)
    opt_step   int32: applied optimiser updates (drives the lr schedule)
    rng        uint32 raw key data (for stochastic layers; folded with step)
    nan_streak int32: consecutive non-finite steps
    nan_total  int32: all skipped steps

`Placement` is where a mesh plugs in: today it puts everything on one device and
jits with donation; with `asura.parallel.mesh` it will give NamedShardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.config import Config
from asura.train.optim import make_optimizer


def build_model(cfg: Config):
    """The model object; imported lazily so the CLI can reject bad configs before importing it."""
    from asura.model import LoopedLM

    return LoopedLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))


def merge_model(graphdef, params, rest):
    """Rebuild the module from a pure param dict (works inside jit)."""
    try:
        return nnx.merge(graphdef, params, rest)
    except (TypeError, ValueError):  # older flax: merge wants nnx.State
        return nnx.merge(graphdef, nnx.State(params), rest)


def init_state(cfg: Config) -> tuple[Any, Any, dict]:
    """(graphdef, rest, state). `rest` is non-param model state, held constant (not trained)."""
    model = build_model(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "opt_step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
        "nan_streak": jnp.zeros((), jnp.int32),
        "nan_total": jnp.zeros((), jnp.int32),
    }
    return graphdef, rest, state


def abstract_state(cfg: Config) -> tuple[Any, Any, dict]:
    """Like init_state, but the state holds ShapeDtypeStructs (no allocation) - for restore targets."""
    out = {}

    def f():
        g, r, s = init_state(cfg)
        out["g"], out["r"] = g, r
        return s

    shapes = jax.eval_shape(f)
    return out["g"], out["r"], shapes


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Placement:
    """Device placement for state and batches, and the jit wrapper that uses it.

    Single device: everything on `jax.devices()[0]`. A mesh-aware version replaces
    `state_sharding`/`batch_sharding` (NamedSharding via asura.parallel) and keeps
    this interface; nothing else in the train package touches devices.
    """

    def __init__(self, cfg: Config, compiler_options: dict | None = None):
        self.cfg = cfg
        self.compiler_options = compiler_options  # XLA options for every jit here (tests: fast compile)
        self.device = jax.devices()[0]
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)
        self.n_devices = 1

    def state(self, state):
        return jax.device_put(state, self.sharding)

    def batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, self.sharding)

    def jit_step(self, fn, donate_state: bool = True):
        """jit a `fn(state, batch, *scalars)`; the state buffers are donated."""
        return jax.jit(fn, donate_argnums=(0,) if donate_state else (), **self._opts())

    def jit_eval(self, fn):
        return jax.jit(fn, **self._opts())

    def abstract(self, shapes):
        """Restore target: ShapeDtypeStructs on this device."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.sharding), shapes)

    def to_local(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)

    def _opts(self) -> dict:
        return {"compiler_options": self.compiler_options} if self.compiler_options else {}
