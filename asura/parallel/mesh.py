"""Device mesh (data, fsdp, tensor) and placement of state and batches on it.

The mesh is global: with several processes it spans every device of every
host. Parameters are sharded by their logical axis names (set on each
``nnx.Param`` by the model) through ``mesh.rules``; a dimension that a mesh
axis does not divide stays replicated on that axis rather than failing, so a
tiny test model still runs on 8 devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asura.config.schema import MESH_AXES, MeshConfig
from asura.parallel.logical import logical_to_spec


class MeshError(ValueError):
    """A mesh shape that cannot be built on the available devices."""


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 in the config to fill the remaining devices."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n_devices % fixed:
            raise MeshError(f"mesh {sizes}: fixed axes ({fixed}) do not divide the {n_devices} devices")
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are available")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Topology-aware placement where the platform supports it (TPU, GPU).
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU or irregular device sets: plain row-major order.
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (replicate instead)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def named_sharding(
    names: Sequence[str | None] | None, shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, Sequence[str]]
) -> NamedSharding:
    if not names:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, _fit_spec(logical_to_spec(names, rules, mesh), shape, mesh))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str]], ndim: int = 2) -> NamedSharding:
    """Batch rows over the `batch` rule (data x fsdp by default); other dims replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)
    return NamedSharding(mesh, spec)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Mapping[str, Sequence[str]]) -> dict:
    """Assemble each process's rows into global arrays sharded over the batch axis."""
    out = {}
    for key, value in local.items():
        sharding = batch_sharding(mesh, rules, np.ndim(value))
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
