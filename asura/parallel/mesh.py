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
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asura.config.schema import MESH_AXES, MeshConfig
from asura.parallel.logical import logical_to_spec


class MeshError(ValueError):
    """A mesh shape that cannot be built on the available devices."""


@dataclass(frozen=True)
class MeshLevels:
    """A mesh's axis sizes at its two levels: within a slice (ICI) and across slices (DCN)."""

    ici: dict[str, int]
    dcn: dict[str, int]
    slice_granule: str  # what one DCN slot is: "slice" (TPU slice_index) or "process"; "" for one level

    @property
    def sizes(self) -> dict[str, int]:
        """Each axis's total size: ICI x DCN."""
        return {a: self.ici[a] * self.dcn[a] for a in MESH_AXES}

    @property
    def slices(self) -> int:
        return math.prod(self.dcn.values())


def _fill(sizes: dict[str, int], n: int, where: str) -> dict[str, int]:
    """Resolve one -1 in `sizes` so that they multiply to n devices."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n % fixed:
            raise MeshError(f"mesh {sizes}: fixed axes ({fixed}) do not divide the {n} devices {where}")
        sizes = {k: (n // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are available {where}")
    return sizes


def mesh_levels(cfg: MeshConfig, n_devices: int, slices: int = 1, granule: str = "slice") -> MeshLevels:
    """Resolve the config for n_devices in `slices` equal granules (slices, or processes); MeshError
    (one line) when the DCN sizes do not multiply to the slices or the ICI sizes do not fill one."""
    dcn = {a: getattr(cfg.dcn, a) for a in MESH_AXES}
    ici = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    span = dcn_span(cfg)
    if span == 1 and slices > 1 and granule == "slice":
        raise MeshError(
            f"the {n_devices} devices span {slices} slices: set mesh.dcn sizes that multiply to {slices} "
            f"(e.g. mesh.dcn.data={slices}: data parallelism over the data-center network)"
        )
    if span == 1:  # one level over every device (one slice, or several processes of one)
        return MeshLevels(_fill(ici, n_devices, "in all"), dcn, "")
    if span != slices:
        raise MeshError(f"mesh.dcn {dcn} spans {_count(span, granule)} but the devices form {_count(slices, granule)}")
    if n_devices % slices:
        raise MeshError(f"{n_devices} devices do not split into {_count(slices, granule)} of equal size")
    return MeshLevels(_fill(ici, n_devices // slices, f"per {granule}"), dcn, granule)


def _count(n: int, granule: str) -> str:
    return f"{n} {granule}" if n == 1 else f"{n} {granule}es" if granule.endswith("s") else f"{n} {granule}s"


def batch_split(rules: Mapping[str, Sequence[str]], sizes: Mapping[str, int]) -> int:
    """How many ways the batch rows split: the product of the mesh axes the `batch` rule names."""
    return math.prod(sizes[a] for a in rules.get("batch", ()))


def dcn_span(cfg: MeshConfig) -> int:
    """How many slices (granules) mesh.dcn spans: the product of its sizes."""
    return math.prod(getattr(cfg.dcn, a) for a in MESH_AXES)


def granules(devices: Sequence, span: int) -> tuple[int, str]:
    """(count, kind) of the DCN granules of a device set: TPU slices (their slice_index), or on other
    platforms, where mesh.dcn spans more than one, the processes (GPU hosts; CPU tests)."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), "slice"
    if span > 1:
        return len({d.process_index for d in devices}), "process"
    return 1, "slice"


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out by jax's topology-aware
    mesh_utils; across slices a hybrid mesh whose DCN axes are the outer ones. MeshError, one line,
    for a shape that does not fit: never a silent fallback to plain device order."""
    devices = list(devices) if devices is not None else jax.devices()
    n, kind = granules(devices, dcn_span(cfg))
    levels = mesh_levels(cfg, len(devices), n, kind)
    ici = tuple(levels.ici[a] for a in MESH_AXES)
    split = cfg.allow_split_physical_axes
    try:
        if not levels.slice_granule:
            arr = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=split)
        else:
            dcn = tuple(levels.dcn[a] for a in MESH_AXES)
            arr = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=levels.slice_granule == "process", allow_split_physical_axes=split
            )
    except (ValueError, NotImplementedError, AssertionError) as e:  # the layout does not tile the torus
        why = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
        hint = "" if split else "; set mesh.allow_split_physical_axes=true or choose axis sizes that tile it"
        raise MeshError(
            f"mesh {levels.sizes} (per slice {levels.ici}) cannot be laid out on {devices[0].device_kind} "
            f"devices: {why}{hint}"
        ) from None
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
