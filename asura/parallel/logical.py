"""Logical axis names -> mesh axes, from `mesh.rules` in the config.

Model code names axes logically (``("batch", "seq", "embed")``) and never
mentions devices. `constrain` is a no-op until `use_rules` installs a mesh,
so single-device code and tests run unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_STATE: dict[str, object] = {"mesh": None, "rules": None}


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Mapping[str, Sequence[str]]) -> Iterator[None]:
    """Install (mesh, rules) for `constrain` and `logical_to_spec` inside the block."""
    old = dict(_STATE)
    _STATE.update(mesh=mesh, rules=dict(rules))
    try:
        yield
    finally:
        _STATE.update(old)


def logical_to_spec(
    names: Sequence[str | None], rules: Mapping[str, Sequence[str]] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis is used at most once."""
    rules = rules if rules is not None else (_STATE["rules"] or {})
    mesh = mesh if mesh is not None else _STATE["mesh"]
    used: set[str] = set()
    out: list[object] = []
    for name in names:
        axes = [a for a in rules.get(name, ()) if a not in used] if name else []
        if mesh is not None:
            axes = [a for a in axes if mesh.shape.get(a, 1) > 1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def active_mesh() -> Mesh | None:
    """The mesh installed by `use_rules` (None outside it)."""
    return _STATE["mesh"]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; identity when no mesh is installed."""
    mesh = _STATE["mesh"]
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))
