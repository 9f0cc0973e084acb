"""Typed ``search:`` and ``pruner:`` sections of a sweep spec.

    search: {method: tpe, n_trials: 8, seed: 0,
             params: {train.lr: {low: 1e-4, high: 1e-2, log: true}, model.injection: {choices: [add, none]}}}
    pruner: {percentile: 50, warmup_evals: 1, startup_trials: 2}      # or null / none / false

Every searched value the spec names (each choice, both ends of a range) is applied to the base
config and validated at load. Search methods are a registry whose entries build the optuna
sampler, so optuna is imported only when a study is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asura.config.schema import Config
from asura.registry import Registry
from asura.sweep.keys import SpecError, apply, check_keys, field_type

SEARCH_KEYS = ("method", "n_trials", "seed", "params")
PARAM_KEYS = ("low", "high", "log", "step", "choices")
PRUNER_KEYS = ("percentile", "warmup_evals", "startup_trials")


@dataclass(frozen=True)
class ParamSpec:
    """One searched dotted config key: categorical ``choices``, or an int/float range."""

    key: str
    choices: tuple = ()  # non-empty for a categorical parameter (then the range fields are unused)
    type: str = "float"  # "int" | "float" for a range
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    @property
    def values(self) -> tuple:
        """The values the spec names: checked against the config schema at load."""
        return self.choices or (self.low, self.high)

    def suggest(self, trial) -> Any:
        """Draw this parameter from an optuna trial."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpec:
    method: str  # a SEARCH_METHODS name
    n_trials: int  # COMPLETE + PRUNED trials to reach, counted across invocations and workers
    seed: int  # the sampler's seed
    params: tuple[ParamSpec, ...]

    def sampler(self):
        return SEARCH_METHODS[self.method].build(self)


@dataclass(frozen=True)
class PrunerSpec:
    percentile: float  # prune a trial below this percentile of the others at the same eval
    warmup_evals: int  # evals of a trial before it may be pruned
    startup_trials: int  # trials that finish before any pruning


@dataclass(frozen=True)
class SearchMethod:
    doc: str
    build: Callable[[SearchSpec], Any]  # -> optuna sampler (optuna imported inside)


def _random(search: SearchSpec):
    import optuna

    return optuna.samplers.RandomSampler(seed=search.seed)


def _tpe(search: SearchSpec):
    import optuna

    # A third of the budget (1..10 trials) is sampled at random before TPE models the results.
    startup = min(10, max(1, search.n_trials // 3))
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup)


SEARCH_METHODS: Registry[SearchMethod] = Registry("search.method", "how a search sweep proposes trials")
SEARCH_METHODS.add("random", SearchMethod("independent uniform draws", _random))
SEARCH_METHODS.add("tpe", SearchMethod("tree-structured Parzen estimator after random startup trials", _tpe))


def _parse_param(key: str, p: Any, base: Config) -> ParamSpec:
    where = f"search.params.{key}"
    check_keys(where, p, PARAM_KEYS)
    tp = field_type(key)
    if "choices" in p:
        if set(p) != {"choices"} or not isinstance(p["choices"], list) or not p["choices"]:
            raise SpecError(f"{where}: choices must be a non-empty list and stand alone")
        for c in p["choices"]:
            apply(base, {key: c}, f"{where} choice {c!r}")
        return ParamSpec(key, choices=tuple(p["choices"]))
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
        apply(base, {key: v}, f"{where} value {v}")
    step = None if p.get("step") is None else tp(p["step"])
    if step is not None and step <= 0:
        raise SpecError(f"{where}: step must be > 0, got {p['step']!r}")
    return ParamSpec(key, type=tp.__name__, low=lo, high=hi, log=bool(p.get("log", False)), step=step)


def parse_search(raw: Any, base: Config) -> SearchSpec:
    check_keys("search", raw, SEARCH_KEYS)
    method = raw.get("method", "tpe")
    if method not in SEARCH_METHODS:
        raise SpecError(SEARCH_METHODS.invalid(method))
    n = raw.get("n_trials")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SpecError(f"search.n_trials must be a positive integer, got {n!r}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpecError("search.params must map dotted config keys to {low, high[, log, step]} or {choices}")
    parsed = tuple(_parse_param(str(k), p, base) for k, p in params.items())
    return SearchSpec(method, n, int(raw.get("seed", 0)), parsed)


def parse_pruner(raw: Any) -> PrunerSpec | None:
    if raw is None or raw is False or raw == "none":
        return None
    check_keys("pruner", raw, PRUNER_KEYS)
    pct = raw.get("percentile", 50)
    if not isinstance(pct, int | float) or isinstance(pct, bool) or not 0 < pct < 100:
        raise SpecError(f"pruner.percentile must be in (0, 100), got {pct!r}")
    counts = {}
    for k, default in (("warmup_evals", 1), ("startup_trials", 2)):
        v = raw.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SpecError(f"pruner.{k} must be an integer >= 0, got {v!r}")
        counts[k] = v
    return PrunerSpec(float(pct), **counts)
