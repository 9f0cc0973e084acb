"""Sweep metrics: what a spec's ``metric:`` may name, each with the eval key it reads.

The train loop writes ``eval/d{n}/{key}`` for every evaluated depth n (asura.depth.eval_depths);
``asura.sweep.trainer.parse_eval`` turns a record into {n: {key: value}} and the runner reads
``key`` at depth ``metric@n`` (default: the trial's training depth model.iterations). A depth
the trial does not evaluate is an error, never a neighbouring depth.

    ce           final-iteration cross-entropy, masked token mean (minimize; the default)
    exact_match  fraction of examples whose answer is fully right (maximize)
    accuracy     token accuracy (maximize)
    objective    the training objective (minimize); see `Metric.same_config`

``parse_metric`` and ``incomparable`` are shared by the spec (at load, on the configs it will
train) and the report (on the manifests' configs), so both refuse the same mixes in the same words.

Pure python: the spec loader imports this before any trial runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asura.registry import Registry


@dataclass(frozen=True)
class Metric:
    key: str  # the name inside eval/d{n}/{key} of metrics.jsonl
    direction: str  # the optuna study direction: "minimize" | "maximize"
    doc: str
    # Config keys that change what the number means: values are only comparable between runs that
    # agree on all of them, so a spec whose trials differ in one is refused at load.
    same_config: tuple[str, ...] = ()
    bounds: tuple[float | None, float | None] = (None, None)  # the values it can take: intervals are cut to it


METRICS: Registry[Metric] = Registry("metric", "what a sweep optimises and tabulates (optionally @depth)")
METRICS.add("ce", Metric("ce", "minimize", "final-iteration cross-entropy (masked token mean)", bounds=(0.0, None)))
METRICS.add(
    "exact_match", Metric("exact_match", "maximize", "fraction of examples answered exactly", bounds=(0.0, 1.0))
)
METRICS.add("accuracy", Metric("accuracy", "maximize", "token accuracy at the final iteration", bounds=(0.0, 1.0)))
METRICS.add(
    "objective",
    Metric(
        "objective",
        "minimize",
        "the training objective: guidance-weighted CE over iterations + z-loss",
        # guidance weights CE over iterations and z_loss adds a penalty term: with either changed the
        # same model scores a different number, so a difference would not be a difference in quality.
        same_config=("model.guidance", "model.guidance_weights", "model.z_loss"),
        bounds=(0.0, None),
    ),
)
DEFAULT_METRIC = "ce"
RENAMED = {"eval_loss": "ce", "eval_exact_match": "exact_match"}  # names older specs used


@dataclass(frozen=True)
class MetricSpec:
    """A spec's ``metric: name[@depth]``, resolved against the registry."""

    name: str
    depth: int | None  # None = each trial's training depth model.iterations
    entry: Metric

    @property
    def direction(self) -> str:
        return self.entry.direction

    @property
    def label(self) -> str:
        """How tables and manifests name it: ``ce`` or ``ce@4``."""
        return self.name if self.depth is None else f"{self.name}@{self.depth}"


class MetricError(ValueError):
    """A metric name that is not registered, renamed, or has a bad @depth; one line."""


def parse_metric(raw: Any) -> MetricSpec:
    """``name[@depth]`` resolved against the registry; ``MetricError`` otherwise."""
    name, at, depth = str(raw).partition("@")
    if name in RENAMED:
        raise MetricError(f"metric={raw!r} was renamed {RENAMED[name]!r}; choose one of {', '.join(METRICS.names)}")
    if name not in METRICS:
        raise MetricError(f"{METRICS.invalid(raw)} (optionally @depth)")
    if at and not (depth.isdigit() and int(depth) >= 1):
        raise MetricError(f"metric={raw!r}: the depth after @ must be a positive integer")
    return MetricSpec(name, int(depth) if at else None, METRICS[name])


def incomparable(metric: MetricSpec, runs: Sequence[tuple[str, Callable[[str], Any]]]) -> str | None:
    """Why ``metric`` cannot compare these runs (one line), or None when it can.

    ``runs`` is (name, get) with ``get(dotted_key)`` the run's config value. A metric whose meaning
    depends on config keys (``Metric.same_config``) compares only runs that agree on all of them.
    """
    keys = metric.entry.same_config
    if not runs:
        return None
    first, get0 = runs[0]
    for name, get in runs[1:]:
        for k in keys:
            a, b = get0(k), get(k)
            if a != b:
                return (
                    f"metric={metric.name} ({metric.entry.doc}) is only comparable between runs with the same "
                    f"{', '.join(keys)}; {first} has {k}={a!r} but {name} has {b!r}: use metric: {DEFAULT_METRIC}"
                )
    return None


class MetricMissing(RuntimeError):
    """An eval record lacks the sweep metric at the depth it is read at; fails the trial."""


def metric_value(metric: MetricSpec, iterations: int, depths: dict) -> float:
    """The metric from one eval's {depth: {key: value}}, at metric@depth or the training depth."""
    want = metric.depth or iterations
    by_depth = {int(d): m for d, m in depths.items()}
    if want not in by_depth:
        where = "metric@depth" if metric.depth else "the training depth model.iterations"
        raise MetricMissing(
            f"{metric.label}: the eval has no depth {want} ({where}); it evaluated depths {sorted(by_depth)}"
        )
    value = by_depth[want].get(metric.entry.key)
    if not isinstance(value, int | float):
        raise MetricMissing(
            f"{metric.label}: eval/d{want}/{metric.entry.key} is missing; the eval recorded {sorted(by_depth[want])}"
        )
    return float(value)
