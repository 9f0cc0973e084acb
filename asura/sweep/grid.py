"""The grid of a sweep: every trial cell, built and validated once when the spec loads.

    variants × axes × seeds   -> one "trial" cell each (group = variant + axis values)
    each looped trial cell    -> one cell per baseline kind (asura.baselines.BASELINES),
                                 or an `Impossible` entry when the kind misses its tolerance

Identical configs (ignoring ``name``) are one cell: a later label that resolves to a config
already planned is recorded in that cell's ``aliases`` instead of being trained twice. Cell
keys are unique and stable across invocations, which is what resuming relies on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass

from asura.baselines import BASELINES, BaselineImpossible
from asura.config.load import ConfigError, config_to_dict
from asura.config.schema import Config
from asura.sweep.keys import SpecError, apply


@dataclass(frozen=True)
class Cell:
    """One grid trial: a fully resolved config plus where it sits in the sweep."""

    key: str  # unique within the sweep: "<group>|seed=<s>"
    group: str  # the key without the seed: rows are grouped over seeds by it
    seed: int
    role: str  # "trial" or a baseline kind
    parent: str | None  # baseline: the looped group it was derived from
    overrides: dict
    config: Config
    aliases: tuple[str, ...] = ()  # other baseline labels that resolved to this exact config


@dataclass(frozen=True)
class Impossible:
    """A baseline that cannot meet its tolerance: listed in the report, never silently dropped."""

    group: str
    role: str  # the baseline kind
    parent: str
    reason: str  # one line from BaselineImpossible


@dataclass(frozen=True)
class Grid:
    cells: tuple[Cell, ...] = ()  # baselines included, identical configs deduplicated
    impossible: tuple[Impossible, ...] = ()  # recorded for the first seed only

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.group for c in self.cells))


def config_hash(cfg: Config) -> str:
    data = config_to_dict(cfg)
    data.pop("name", None)  # two identical models with different names are one run
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def is_looped(cfg: Config) -> bool:
    return cfg.model.max_iterations > 1 or cfg.model.iterations > 1


def _short(key: str, all_keys) -> str:
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in all_keys) == 1 else key


def build_grid(
    base: Config, variants: dict[str, dict], axes: dict[str, list], seeds: tuple[int, ...], baselines: tuple[str, ...]
) -> Grid:
    """Every cell of the grid, each config validated (SpecError naming the trial otherwise)."""
    variants = variants or {"": {}}
    axis_keys = list(axes)
    cells: list[Cell] = []
    by_hash: dict[str, int] = {}
    impossible: list[Impossible] = []

    def add(cell: Cell, label: str) -> None:
        h = config_hash(cell.config)
        if h in by_hash:  # identical run already planned: record the alias instead of training twice
            i = by_hash[h]
            cells[i] = dataclasses.replace(cells[i], aliases=(*cells[i].aliases, label))
            return
        by_hash[h] = len(cells)
        cells.append(cell)

    looped: list[Cell] = []
    for (vname, vover), combo in itertools.product(variants.items(), itertools.product(*axes.values())):
        parts = [vname] if vname else []
        parts += [f"{_short(k, axis_keys)}={v}" for k, v in zip(axis_keys, combo)]
        group = ",".join(parts) or "base"
        over = {**vover, **dict(zip(axis_keys, combo))}
        for s in seeds:
            cfg = apply(base, {**over, "train.seed": s}, f"trial {group} seed={s}")
            cell = Cell(f"{group}|seed={s}", group, s, "trial", None, over, cfg)
            add(cell, cell.key)
            if is_looped(cfg):
                looped.append(cell)
    for cell in looped:
        for kind in baselines:
            group = f"{kind}({cell.group})"
            try:
                cfg = BASELINES[kind].build(cell.config)
            except BaselineImpossible as e:
                if cell.seed == seeds[0]:
                    impossible.append(Impossible(group, kind, cell.group, str(e)))
                continue
            except ConfigError as e:
                raise SpecError(f"baseline {group}: {e}") from None
            add(Cell(f"{group}|seed={cell.seed}", group, cell.seed, kind, cell.group, cell.overrides, cfg), group)
    return Grid(tuple(cells), tuple(impossible))
