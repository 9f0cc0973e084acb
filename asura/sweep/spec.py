"""Sweep spec: YAML schema, up-front validation, and the grid of trial cells (built once).

A spec names a base train config plus overrides and either a grid (named `variants`
× cartesian `axes` × `seeds`) or an optuna `search`. ``load_spec`` builds and validates every
trial config here, before any study or training starts, so a typo costs a one-line
``SpecError`` (exit 2) rather than a half-finished sweep. The grid is stored on the spec
(``spec.grid``); nothing downstream rebuilds it.

    extends: other.yaml                # optional; relative to this file; a list merges left to right
    base: ../demo.yaml                 # relative to the file that names it
    overrides: {train.steps: 200}      # dotted keys, applied to base
    variants: {full: {}, no_inject: {model.injection: none}}
    axes: {model.adapter: [none, abba]}
    seeds: [0, 1]                      # the train.seed axis
    search: {method: tpe, n_trials: 8, params: {train.lr: {low: 1e-4, high: 1e-2, log: true}}}
    metric: ce                         # asura.sweep.metrics.METRICS, optionally @depth
    pruner: {percentile: 50, warmup_evals: 1, startup_trials: 2}   # or null
    baselines: false                   # true (the default kinds) or a list of kinds (also --baselines)
    reference: full                    # group every table row is compared against
    storage: sqlite:///...             # default: sqlite in the sweep workdir
    study_name: name                   # default: the spec file's stem
    protocol: {seeds: [0, 1, 2], family: [iso_param], min_seeds: 3}   # asura.sweep.protocol
    tune: {lr: [1.0e-3, 3.0e-3], seeds: [100, 101]}   # lr tuned per group first: asura.sweep.tuning

``extends`` merges the parent's mappings (overrides, variants, axes, search, pruner) one level deep, the
child's entries replacing the parent's of the same name; any other value (and ``null``) replaces.
``study_name`` is never inherited: a child is another sweep, so it gets its own default dir.

Overrides from outside the file (``extra_overrides``: a study preset's, then the command line's
``key=value``) apply after ``overrides``, to the base of every trial; variants and axes still apply on top,
so an override of an axis or searched key (which would change no trial) is refused. They are kept
apart on the spec (``SweepSpec.extra_overrides``) because the runner records them and refuses to
resume a sweep dir with different ones.

Invariants checked at load (so a number in a table always means what its header says):
every trial evaluates the depth of ``metric@depth`` (asura.depth.eval_depths), and a metric
with ``same_config`` keys (``objective``) is refused when the trials differ in one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asura.baselines import BASELINES, DEFAULT_BASELINES
from asura.config.load import ConfigError, load_config
from asura.config.schema import Config
from asura.depth import eval_depths
from asura.sweep.grid import Cell, Grid, Impossible, build_grid, config_hash, is_looped
from asura.sweep.keys import SpecError, apply, field_type, get, parse_overrides, read_yaml, suggest
from asura.sweep.metrics import DEFAULT_METRIC, MetricError, MetricSpec, incomparable, parse_metric
from asura.sweep.protocol import Protocol, check_family, parse_protocol
from asura.sweep.search import PrunerSpec, SearchSpec, parse_pruner, parse_search
from asura.sweep.tuning import TuneSpec, parse_tune

TOP_KEYS = (
    "base", "overrides", "variants", "axes", "seeds", "search", "metric", "pruner",
    "baselines", "reference", "storage", "study_name", "description", "extends", "protocol", "tune",
)  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: Path
    overrides: dict  # the spec file's own (its extends chain's), plus extra_overrides
    variants: dict[str, dict]
    axes: dict[str, list]
    seeds: tuple[int, ...]
    search: SearchSpec | None  # None: a grid sweep
    metric: MetricSpec
    pruner: PrunerSpec | None  # None: every trial runs to the end
    baselines: tuple[str, ...]  # asura.baselines.BASELINES names
    reference: str | None
    storage: str | None
    study_name: str
    base_config: Config = field(repr=False)
    grid: Grid = field(default_factory=Grid, repr=False)  # empty for a search
    extra_overrides: dict = field(default_factory=dict)  # from outside the file: study preset, then command line
    protocol: Protocol | None = None  # asura.sweep.protocol; None: every verdict is exploratory
    tune: TuneSpec | None = None  # asura.sweep.tuning; None: every group trains at train.lr


@dataclass(frozen=True)
class _Probe:
    """A config the sweep will train (grid) or one value of a searched key (search), for load checks."""

    name: str
    config: Config
    baseline: bool = False


def _mapping_of_overrides(where: str, raw: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping of dotted keys to values, got {raw!r}")
    for k in raw:
        field_type(str(k))
        if k == "train.seed":
            raise SpecError(f"{where}: set train.seed through the top-level seeds: [...] axis")
    return {str(k): v for k, v in raw.items()}


def _parse_metric(raw: Any) -> MetricSpec:
    try:
        return parse_metric(raw)
    except MetricError as e:
        raise SpecError(str(e)) from None


def _parse_baselines(raw: Any, forced: bool) -> tuple[str, ...]:
    if raw is True or (forced and not raw):
        return DEFAULT_BASELINES
    if raw is False or raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError(f"baselines must be true, false or a list of {', '.join(BASELINES.names)}; got {raw!r}")
    for k in raw:
        if k not in BASELINES:
            raise SpecError(f"baselines has {k!r}; {suggest(k, BASELINES.names)}")
    if len(set(raw)) != len(raw):
        raise SpecError(f"baselines has duplicates: {raw}")
    return tuple(raw)


def _check_depth(metric: MetricSpec, probes: list[_Probe]) -> None:
    """metric@d: every trial must evaluate depth d (no trial is read at a neighbouring depth)."""
    d = metric.depth
    if d is None:  # the training depth model.iterations is always evaluated
        return
    for p in probes:
        depths = eval_depths(p.config)
        if d in depths:
            continue
        fix = (
            f"baselines are not looped and run depth 1 only: drop @{d} or the baselines"
            if p.baseline
            else f"add {d} to train.eval_depths or drop @{d} (read each trial at model.iterations)"
        )
        raise SpecError(
            f"metric={metric.label}: {p.name} evaluates depths {depths} "
            f"(train.eval_depths or 1..model.max_iterations, plus model.iterations), not {d}; {fix}"
        )


def _check_comparable(metric: MetricSpec, probes: list[_Probe]) -> None:
    """A metric whose meaning depends on config keys is refused when the trials differ in one."""
    reason = incomparable(metric, [(p.name, lambda k, c=p.config: get(c, k)) for p in probes])
    if reason:
        raise SpecError(reason)


def _grid_probes(grid: Grid) -> list[_Probe]:
    out = []
    for c in grid.cells:
        baseline = c.role != "trial"
        out.append(_Probe(f"{'baseline' if baseline else 'trial'} {c.key}", c.config, baseline))
    return out


def _search_probes(search: SearchSpec, base: Config) -> list[_Probe]:
    probes = []  # base + one value each: a key nobody searches keeps the base's value in every trial
    for p in search.params:
        for v in p.values:
            probes.append(_Probe(f"search.params.{p.key}={v!r}", apply(base, {p.key: v}, f"search.params.{p.key}")))
    return probes


def _merge(parent: dict, child: dict) -> dict:
    """One level deep: a mapping in both is merged (the child's entries win); anything else is replaced."""
    out = dict(parent)
    for k, v in child.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_spec_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[Path, dict]:
    """(resolved path, mapping) of a spec with its ``extends`` chain merged; SpecError (one line) on a
    cycle, a missing parent or an unknown key in any file of the chain."""
    path, raw = read_yaml(path, "sweep spec", TOP_KEYS)
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise SpecError(f"sweep spec `extends` cycle: {chain}; a spec cannot extend itself, directly or not")
    raw = dict(raw)
    if "base" in raw:  # relative to the file that names it, wherever the child lives
        raw["base"] = str((path.parent / str(raw["base"])).resolve())
    parents = raw.pop("extends", None)
    if parents is None:
        return path, raw
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpecError(f"sweep spec {path.name}: extends must be a spec path or a list of them, got {parents!r}")
    merged: dict = {}
    for parent in parents:
        _, data = read_spec_file(path.parent / parent, (*_seen, path))
        data.pop("study_name", None)  # a child is another sweep: sharing the parent's dir would mix their trials
        merged = _merge(merged, data)
    return path, _merge(merged, raw)


def _check_unswept(extra: dict, axes: dict, search: SearchSpec | None) -> None:
    """An extra override of a key every trial sets again (an axis, a searched key) would change no trial."""
    swept = {*axes, *(p.key for p in search.params)} if search is not None else set(axes)
    for k in extra:
        if k in swept:
            where = "search.params" if k not in axes else "axes"
            raise SpecError(f"override {k}: the spec sweeps it ({where}.{k}), so it would change no trial; drop it")


def load_spec(
    path: str | Path, baselines: bool = False, extra_overrides: dict | None = None, cli_overrides: Sequence[str] = ()
) -> SweepSpec:
    """Parse and validate a spec file (``baselines`` forces --baselines). Raises SpecError.

    ``extra_overrides`` (dotted keys) apply after the spec's own ``overrides``: a study preset uses
    them to scale every sweep of a study up for a GPU or TPU without copying the specs. ``cli_overrides``
    (``key=value`` strings, train.py's syntax) are the command line's and apply last."""
    path, raw = read_spec_file(path)
    if "base" not in raw:
        raise SpecError(f"sweep spec {path.name}: missing `base:` (a train config path, relative to the spec)")
    base_path = (path.parent / str(raw["base"])).resolve()
    try:
        base_cfg = load_config(base_path)
    except ConfigError as e:
        raise SpecError(f"base config: {e}") from None
    overrides = _mapping_of_overrides("overrides", raw.get("overrides"))
    extra = _mapping_of_overrides("preset overrides", extra_overrides)
    extra.update(_mapping_of_overrides("command-line override", parse_overrides(cli_overrides)))
    overrides.update(extra)
    base_cfg = apply(base_cfg, overrides, "overrides")
    # Recorded as the config holds them (train.lr=3e-3 and =0.003 are one override), so a resume compares values.
    extra = {k: get(base_cfg, k) for k in extra}

    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, dict):
        raise SpecError("variants must map a name to a mapping of dotted overrides")
    variants = {str(n): _mapping_of_overrides(f"variants.{n}", v) for n, v in variants_raw.items()}
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise SpecError("axes must map dotted config keys to lists of values")
    axes = {}
    for k, vals in axes_raw.items():
        _mapping_of_overrides("axes", {k: None})
        if not isinstance(vals, list) or not vals:
            raise SpecError(f"axes.{k} must be a non-empty list, got {vals!r}")
        axes[str(k)] = vals
    seeds = raw.get("seeds", [base_cfg.train.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpecError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds has duplicates: {seeds}")

    search = None
    if raw.get("search") is not None:
        if variants or axes:
            raise SpecError("search cannot be combined with variants/axes; run one sweep per grid cell")
        if len(seeds) > 1:
            raise SpecError("search takes one seed; confirm the best configs with a grid over seeds")
        search = parse_search(raw["search"], base_cfg)
    _check_unswept(extra, axes, search)
    kinds = _parse_baselines(raw.get("baselines", False), baselines)
    if kinds and search is not None:
        raise SpecError("baselines need a grid sweep (variants/axes/seeds), not a search")
    metric = _parse_metric(raw.get("metric", DEFAULT_METRIC))
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise SpecError(f"storage must be an SQLAlchemy URL like sqlite:///path.db, got {storage!r}")
    reference = None if raw.get("reference") is None else str(raw["reference"])
    protocol = parse_protocol(raw.get("protocol"), tuple(seeds), metric.entry.bounds)
    if protocol is not None and search is not None:
        raise SpecError("protocol needs a grid sweep (variants/axes/seeds): a search is exploratory by design")
    tune = parse_tune(raw.get("tune"), tuple(seeds))
    if tune is not None and search is not None:
        raise SpecError("tune needs a grid sweep (variants/axes/seeds); a search tunes by itself")
    pruner = parse_pruner(raw.get("pruner", {}))
    if protocol is not None and pruner is not None:
        raise SpecError("protocol with a pruner: a pruned trial would drop a pre-registered seed; set pruner: null")

    if search is None:
        grid = build_grid(base_cfg, variants, axes, tuple(seeds), kinds)  # builds and validates every trial
        if reference is not None and reference not in grid.groups:
            raise SpecError(f"reference={reference!r} is not a group; {suggest(reference, sorted(grid.groups))}")
        probes = _grid_probes(grid)
        check_family(protocol, list(grid.groups), reference)
    else:
        grid, probes = Grid(), _search_probes(search, base_cfg)
    _check_depth(metric, probes)
    _check_comparable(metric, probes)
    return SweepSpec(
        path=path,
        base=base_path,
        overrides=overrides,
        variants=variants,
        axes=axes,
        seeds=tuple(seeds),
        search=search,
        metric=metric,
        pruner=pruner,
        baselines=kinds,
        reference=reference,
        storage=storage,
        study_name=str(raw.get("study_name") or path.stem),
        base_config=base_cfg,
        grid=grid,
        extra_overrides=extra,
        protocol=protocol,
        tune=tune,
    )


__all__ = [
    "Cell", "Grid", "Impossible", "MetricSpec", "PrunerSpec", "SearchSpec", "SpecError", "SweepSpec",
    "config_hash", "field_type", "is_looped", "load_spec",
]  # fmt: skip
