"""Sweep spec: YAML schema, up-front validation and the list of trial cells.

A spec names a base train config plus overrides and either a grid (named `variants`
× cartesian `axes` × `seeds`) or an optuna `search`. Every trial config is built and
validated with ``asura.config`` here, before any study or training starts, so a typo
costs a one-line ``SpecError`` (exit 2) rather than a half-finished sweep.

    base: ../demo.yaml                 # relative to this file
    overrides: {train.steps: 200}      # dotted keys, applied to base
    variants: {full: {}, no_inject: {model.injection: none}}
    axes: {model.adapter: [none, abba]}
    seeds: [0, 1]                      # the train.seed axis
    search: {method: tpe, n_trials: 8, params: {train.lr: {low: 1e-4, high: 1e-2, log: true}}}
    metric: eval_loss                  # eval_loss | eval_exact_match, optionally @depth
    pruner: {percentile: 50, warmup_evals: 1, startup_trials: 2}   # or null
    baselines: false                   # true or a list of kinds (also --baselines)
    reference: full                    # group every table row is compared against
    storage: sqlite:///...             # default: sqlite in the sweep workdir
    study_name: name                   # default: the spec file's stem
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asura.config.load import ConfigError, config_to_dict, load_config, with_overrides
from asura.config.schema import Config


class SpecError(ValueError):
    """A bad sweep spec; the message is one line naming the key."""


TOP_KEYS = (
    "base", "overrides", "variants", "axes", "seeds", "search", "metric", "pruner",
    "baselines", "reference", "storage", "study_name", "description",
)  # fmt: skip
SEARCH_KEYS = ("method", "n_trials", "seed", "params")
PARAM_KEYS = ("low", "high", "log", "step", "choices")
PRUNER_KEYS = ("percentile", "warmup_evals", "startup_trials")
METRICS = {"eval_loss": ("loss", "minimize"), "eval_exact_match": ("exact_match", "maximize")}
BASELINE_KINDS = ("iso_param", "iso_flop_depth", "iso_flop_width", "token_matched")
DEFAULT_BASELINES = ("iso_param", "iso_flop_depth", "iso_flop_width")


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
class SweepSpec:
    path: Path
    base: Path
    overrides: dict
    variants: dict[str, dict]
    axes: dict[str, list]
    seeds: tuple[int, ...]
    search: dict | None
    metric: str
    depth: int | None  # metric@depth; None = the training depth model.iterations
    direction: str
    pruner: dict | None
    baselines: tuple[str, ...]
    reference: str | None
    storage: str | None
    study_name: str
    base_config: Config = field(repr=False)


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "valid: " + ", ".join(valid)


def _check_keys(where: str, data: dict, valid) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {data!r}")
    for k in data:
        if k not in valid:
            raise SpecError(f"{where}: unknown key {k!r}; {_suggest(k, valid)}")


def field_type(dotted: str) -> Any:
    """Schema type of a dotted config key (``model.d_model`` -> int); SpecError if unknown."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise SpecError(f"unknown config key {dotted!r}; {_suggest(part, sorted(names))}")
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls) and i < len(parts) - 1:
            if typing.get_origin(cls) is dict:  # mesh.rules.<axis>
                return typing.get_args(cls)[1]
            raise SpecError(f"config key {dotted!r}: {part!r} is not a section")
    if dataclasses.is_dataclass(cls):
        raise SpecError(f"config key {dotted!r} is a section; name a field inside it")
    return cls


def _apply(base: Config, overrides: dict, where: str) -> Config:
    for k in overrides:
        field_type(k)  # one-line error naming the bad dotted key, before with_overrides
    try:
        return with_overrides(base, overrides)
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def _short(key: str, all_keys) -> str:
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in all_keys) == 1 else key


def config_hash(cfg: Config) -> str:
    data = config_to_dict(cfg)
    data.pop("name", None)  # two identical models with different names are one run
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _parse_search(raw: Any, base: Config) -> dict:
    _check_keys("search", raw, SEARCH_KEYS)
    method = raw.get("method", "tpe")
    if method not in ("random", "tpe"):
        raise SpecError(f"search.method={method!r}; choose random or tpe")
    n = raw.get("n_trials")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SpecError(f"search.n_trials must be a positive integer, got {n!r}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpecError("search.params must map dotted config keys to {low, high[, log, step]} or {choices}")
    out = {}
    for key, p in params.items():
        where = f"search.params.{key}"
        _check_keys(where, p, PARAM_KEYS)
        tp = field_type(key)
        if "choices" in p:
            if set(p) != {"choices"} or not isinstance(p["choices"], list) or not p["choices"]:
                raise SpecError(f"{where}: choices must be a non-empty list and stand alone")
            for c in p["choices"]:
                _apply(base, {key: c}, f"{where} choice {c!r}")
            out[key] = {"choices": list(p["choices"])}
            continue
        if tp not in (int, float):
            raise SpecError(f"{where}: {key} is {getattr(tp, '__name__', tp)}; use choices: [...]")
        lo, hi = p.get("low"), p.get("high")
        try:
            lo, hi = tp(float(lo)), tp(float(hi))  # YAML reads 1e-3 as a string
        except (TypeError, ValueError):
            raise SpecError(f"{where}: low and high must be numbers, got {p.get('low')!r}, {p.get('high')!r}") from None
        if not lo < hi:
            raise SpecError(f"{where}: low={lo} must be < high={hi}")
        if p.get("log") and lo <= 0:
            raise SpecError(f"{where}: log scale needs low > 0, got {lo}")
        for v in (lo, hi):
            _apply(base, {key: v}, f"{where} value {v}")
        out[key] = {"type": tp.__name__, "low": lo, "high": hi, "log": bool(p.get("log", False))}
        if p.get("step") is not None:
            out[key]["step"] = tp(p["step"])
    return {"method": method, "n_trials": n, "seed": int(raw.get("seed", 0)), "params": out}


def _parse_pruner(raw: Any) -> dict | None:
    if raw is None or raw is False or raw == "none":
        return None
    _check_keys("pruner", raw, PRUNER_KEYS)
    pct = raw.get("percentile", 50)
    if not isinstance(pct, int | float) or not 0 < pct < 100:
        raise SpecError(f"pruner.percentile must be in (0, 100), got {pct!r}")
    out = {"percentile": float(pct)}
    for k, default in (("warmup_evals", 1), ("startup_trials", 2)):
        v = raw.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SpecError(f"pruner.{k} must be an integer >= 0, got {v!r}")
        out[k] = v
    return out


def _parse_metric(raw: Any) -> tuple[str, int | None, str]:
    name, _, depth = str(raw).partition("@")
    if name not in METRICS:
        raise SpecError(f"metric={raw!r}; choose one of {', '.join(METRICS)} (optionally @depth)")
    if depth and not depth.isdigit():
        raise SpecError(f"metric={raw!r}: the depth after @ must be a positive integer")
    return name, (int(depth) if depth else None), METRICS[name][1]


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


def load_spec(path: str | Path, baselines: bool = False) -> SweepSpec:
    """Parse and validate a spec file (``baselines`` forces --baselines). Raises SpecError."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SpecError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"sweep spec {path.name} is not valid YAML: {str(e).splitlines()[0]}") from None
    _check_keys(f"sweep spec {path.name}", raw, TOP_KEYS)
    if "base" not in raw:
        raise SpecError(f"sweep spec {path.name}: missing `base:` (a train config path, relative to the spec)")
    base_path = (path.parent / str(raw["base"])).resolve()
    try:
        base_cfg = load_config(base_path)
    except ConfigError as e:
        raise SpecError(f"base config: {e}") from None
    overrides = _mapping_of_overrides("overrides", raw.get("overrides"))
    base_cfg = _apply(base_cfg, overrides, "overrides")

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
        search = _parse_search(raw["search"], base_cfg)

    kinds = raw.get("baselines", False)
    if kinds is True or (baselines and not kinds):
        kinds = list(DEFAULT_BASELINES)
    kinds = tuple(kinds or ())
    for k in kinds:
        if k not in BASELINE_KINDS:
            raise SpecError(f"baselines has {k!r}; {_suggest(k, BASELINE_KINDS)}")
    if kinds and search is not None:
        raise SpecError("baselines need a grid sweep (variants/axes/seeds), not a search")

    metric, depth, direction = _parse_metric(raw.get("metric", "eval_loss"))
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise SpecError(f"storage must be an SQLAlchemy URL like sqlite:///path.db, got {storage!r}")
    spec = SweepSpec(
        path=path,
        base=base_path,
        overrides=overrides,
        variants=variants,
        axes=axes,
        seeds=tuple(seeds),
        search=search,
        metric=metric,
        depth=depth,
        direction=direction,
        pruner=_parse_pruner(raw.get("pruner", {})),
        baselines=kinds,
        reference=None if raw.get("reference") is None else str(raw["reference"]),
        storage=storage,
        study_name=str(raw.get("study_name") or path.stem),
        base_config=base_cfg,
    )
    if search is None:
        cells, _ = grid_cells(spec)  # builds and validates every trial config now
        groups = {c.group for c in cells}
        if spec.reference is not None and spec.reference not in groups:
            raise SpecError(f"reference={spec.reference!r} is not a group; {_suggest(spec.reference, sorted(groups))}")
    return spec


def is_looped(cfg: Config) -> bool:
    return cfg.model.max_iterations > 1 or cfg.model.iterations > 1


def grid_cells(spec: SweepSpec) -> tuple[list[Cell], list[dict]]:
    """All grid cells (baselines included, identical configs deduplicated) and impossible baselines."""
    from asura.baselines import BASELINES, BaselineImpossible

    variants = spec.variants or {"": {}}
    axis_keys = list(spec.axes)
    cells: list[Cell] = []
    by_hash: dict[str, int] = {}
    impossible: list[dict] = []

    def add(cell: Cell, label: str) -> None:
        h = config_hash(cell.config)
        if h in by_hash:  # identical run already planned: record the alias instead of training twice
            i = by_hash[h]
            cells[i] = dataclasses.replace(cells[i], aliases=(*cells[i].aliases, label))
            return
        by_hash[h] = len(cells)
        cells.append(cell)

    looped: list[Cell] = []
    for (vname, vover), combo in itertools.product(variants.items(), itertools.product(*spec.axes.values())):
        parts = [vname] if vname else []
        parts += [f"{_short(k, axis_keys)}={v}" for k, v in zip(axis_keys, combo)]
        group = ",".join(parts) or "base"
        over = {**vover, **dict(zip(axis_keys, combo))}
        for s in spec.seeds:
            cfg = _apply(spec.base_config, {**over, "train.seed": s}, f"trial {group} seed={s}")
            cell = Cell(f"{group}|seed={s}", group, s, "trial", None, over, cfg)
            add(cell, cell.key)
            if is_looped(cfg):
                looped.append(cell)
    for cell in looped:
        for kind in spec.baselines:
            group = f"{kind}({cell.group})"
            try:
                cfg = BASELINES[kind](cell.config)
            except BaselineImpossible as e:
                if cell.seed == spec.seeds[0]:
                    impossible.append({"group": group, "role": kind, "parent": cell.group, "reason": str(e)})
                continue
            except ConfigError as e:
                raise SpecError(f"baseline {group}: {e}") from None
            add(Cell(f"{group}|seed={cell.seed}", group, cell.seed, kind, cell.group, cell.overrides, cfg), group)
    return cells, impossible
