"""A learning rate tuned per arm, on seeds the comparison never uses.

    tune:
      lr: [1.0e-3, 3.0e-3, 1.0e-2]   # the grid, tried for every group (baselines included)
      seeds: [100, 101]              # tuning seeds: disjoint from the spec's seeds

A grid sweep with ``tune`` runs in two phases (``asura.sweep.runner.run_sweep``): first every
group × lr × tuning seed (role ``tune``, keys ``<group>|lr=<lr>|seed=<s>``), then the sweep's own
cells, each with the ``train.lr`` its group scored best with: the mean of the primary metric over
the tuning seeds, in the metric's direction (a tie goes to the smaller lr). An untuned baseline is
a confound in either direction; tuning on the comparison's own seeds would let noise pick the lr.
The choice is a pure function of the tuning records (``choose``), so a report regenerated from the
records shows the same table.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from asura.config.load import with_overrides
from asura.sweep.grid import Cell
from asura.sweep.keys import SpecError, check_keys

TUNE_KEYS = ("lr", "seeds")
ROLE = "tune"


@dataclass(frozen=True)
class TuneSpec:
    lr: tuple[float, ...]
    seeds: tuple[int, ...]

    def to_json(self) -> dict:
        return {"lr": list(self.lr), "seeds": list(self.seeds)}


def parse_tune(raw, spec_seeds: tuple[int, ...]) -> TuneSpec | None:
    if raw is None:
        return None
    check_keys("tune", raw, TUNE_KEYS)
    lr, seeds = raw.get("lr"), raw.get("seeds")
    if not isinstance(lr, list) or len(lr) < 2 or not all(isinstance(x, int | float) and x > 0 for x in lr):
        raise SpecError(f"tune.lr must be a list of at least 2 learning rates > 0, got {lr!r}")
    if len(set(lr)) != len(lr):
        raise SpecError(f"tune.lr has duplicates: {lr}")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpecError(f"tune.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    reused = sorted(set(seeds) & set(spec_seeds))
    if reused:
        raise SpecError(f"tune.seeds {reused} are also the sweep's seeds: tuning seeds must not be reused")
    return TuneSpec(tuple(float(x) for x in sorted(lr)), tuple(seeds))


def tuning_cells(cells: tuple[Cell, ...], tune: TuneSpec) -> tuple[Cell, ...]:
    """Every group (its first cell's config) × lr × tuning seed."""
    first: dict[str, Cell] = {}
    for c in cells:
        first.setdefault(c.group, c)
    out = []
    for group, cell in first.items():
        for lr in tune.lr:
            for s in tune.seeds:
                cfg = with_overrides(cell.config, {"train.lr": lr, "train.seed": s})
                out.append(Cell(f"{group}|lr={lr:g}|seed={s}", f"{group}|lr={lr:g}", s, ROLE, group,
                                {**cell.overrides, "train.lr": lr}, cfg))  # fmt: skip
    return tuple(out)


def choose(records: list[dict], tune: TuneSpec, direction: str) -> dict[str, dict]:
    """{group: {"lr": chosen, "means": {lr: mean}, "n": {lr: seeds}}} from complete tuning records;
    a group is left out until every lr has every tuning seed complete."""
    values: dict[str, dict[float, list[float]]] = {}
    for m in records:
        if m.get("role") == ROLE and m.get("status") == "complete" and m.get("value") is not None:
            lr = float(m["config"]["train"]["lr"])
            values.setdefault(m["parent"], {}).setdefault(lr, []).append(float(m["value"]))
    out = {}
    for group, by_lr in values.items():
        if set(by_lr) != set(tune.lr) or any(len(v) < len(tune.seeds) for v in by_lr.values()):
            continue
        means = {lr: statistics.fmean(v) for lr, v in sorted(by_lr.items())}
        sign = 1.0 if direction == "minimize" else -1.0
        best = min(means, key=lambda lr: (sign * means[lr], lr))
        out[group] = {"lr": best, "means": means, "n": {lr: len(v) for lr, v in by_lr.items()}}
    return out


def tuned(cells: tuple[Cell, ...], chosen: dict[str, dict]) -> tuple[Cell, ...]:
    """The sweep's cells with their group's chosen train.lr."""
    return tuple(
        dataclasses.replace(c, config=with_overrides(c.config, {"train.lr": chosen[c.group]["lr"]})) for c in cells
    )
