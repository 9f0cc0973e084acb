"""Placement: the ONE place that puts train state and batches on devices, and jits the steps.

Two implementations with one interface, so the train loop does not know which it has:

* `Placement`: one device; everything on `jax.devices()[0]`.
* `MeshPlacement`: a (data, fsdp, tensor) mesh. Parameters are sharded by their logical
  axis names through ``mesh.rules``; optimiser-state leaves that mirror a parameter (Adam's
  mu/nu) take that parameter's sharding; scalars are replicated; each process contributes
  its own batch rows, assembled into global arrays sharded over the ``batch`` rule; the
  model's activation constraints (``asura.parallel.logical.constrain``) see the mesh while
  the step is traced.

The parameters' logical axis names come in as `axes` (a params-shaped pytree whose leaves
have `.names`, built by asura.train.state), so placement never builds a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from asura.config import Config
from asura.parallel.logical import use_rules
from asura.parallel.mesh import global_batch, make_mesh, named_sharding


def _path_key(path) -> tuple[str, ...]:
    out = []
    for p in path:
        for attr in ("key", "idx", "name"):
            if hasattr(p, attr):
                out.append(str(getattr(p, attr)))
                break
        else:
            out.append(str(p))
    return tuple(out)


def _names_by_path(axes) -> dict[tuple[str, ...], tuple[str | None, ...] | None]:
    leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: hasattr(x, "names"))[0]
    return {_path_key(path): leaf.names for path, leaf in leaves}


class Placement:
    """Single device: state and batches on `jax.devices()[0]`; jit with state donation."""

    def __init__(self, cfg: Config, compiler_options: dict | None = None):
        self.cfg = cfg
        self.compiler_options = compiler_options  # XLA options for every jit here (tests: fast compile)
        self.sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
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


class MeshPlacement:
    def __init__(self, cfg: Config, axes, mesh: jax.sharding.Mesh | None = None, compiler_options: dict | None = None):
        self.cfg = cfg
        self.compiler_options = compiler_options
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
        self.rules: Mapping = cfg.mesh.rules
        self.n_devices = self.mesh.size
        self._names = _names_by_path(axes)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    # ------------------------------------------------------------- shardings
    def state_shardings(self, state):
        """NamedSharding per leaf of the train-state pytree (arrays or ShapeDtypeStructs)."""
        by_path = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
            key, shape = _path_key(path), tuple(np.shape(leaf))
            by_path[key] = (shape, named_sharding(self._names.get(key), shape, self.mesh, self.rules))

        def one(path, leaf):
            key, shape = _path_key(path), tuple(np.shape(leaf))
            # Longest suffix of the leaf's path that names a parameter of the same shape
            # (params/..., opt_state/0/mu/..., opt_state/0/nu/...).
            for i in range(len(key)):
                param_shape, sharding = by_path.get(key[i:], (None, None))
                if param_shape == shape:
                    return sharding
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, state)

    def abstract(self, shapes):
        """ShapeDtypeStructs carrying target shardings: orbax restores straight onto this mesh."""
        shardings = self.state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    # ------------------------------------------------------------- placement
    def state(self, state):
        return jax.device_put(state, self.state_shardings(state))

    def batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch({k: np.asarray(v) for k, v in batch.items()}, self.mesh, self.rules)

    def to_local(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded array, in order."""
        if jax.process_count() == 1:
            return np.asarray(x)
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        seen, rows = set(), []
        for s in shards:
            start = s.index[0].start or 0
            if start not in seen:
                seen.add(start)
                rows.append(np.asarray(s.data))
        return np.concatenate(rows, axis=0)

    def _traced(self, fn):
        def wrapped(*args):
            with use_rules(self.mesh, self.rules):
                return fn(*args)

        return wrapped

    def _opts(self) -> dict:
        return {"compiler_options": self.compiler_options} if self.compiler_options else {}

    def jit_step(self, fn, donate_state: bool = True):
        return jax.jit(self._traced(fn), donate_argnums=(0,) if donate_state else (), **self._opts())

    def jit_eval(self, fn):
        return jax.jit(self._traced(fn), **self._opts())


def make_placement(cfg: Config, axes, compiler_options: dict | None = None):
    """Placement on one device, MeshPlacement whenever there are several."""
    if jax.device_count() == 1:
        return Placement(cfg, compiler_options)
    return MeshPlacement(cfg, axes, compiler_options=compiler_options)
