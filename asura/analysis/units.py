"""What a plotted quantity is called on an axis, with its unit: the one table every plot reads.

    axis_label(["ce"])                     -> "cross-entropy (nats/token)"
    axis_label(["loss", "rel_change"])     -> "cross-entropy (nats); relative latent change (ratio)"

Keys are the eval metric names (asura.train.evaluate: ``ce``, ``accuracy``, ...) and the telemetry
keys (asura.analysis.telemetry.KEYS). Pure python: the sweep report imports it without matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Quantity(NamedTuple):
    name: str
    unit: str


QUANTITIES = {
    # eval metrics, averaged over scored tokens or examples
    "ce": Quantity("cross-entropy", "nats/token"),
    "objective": Quantity("training objective", "nats/token"),
    "accuracy": Quantity("token accuracy", "fraction of scored tokens"),
    "exact_match": Quantity("exact match", "fraction of examples"),
    "bits_per_byte": Quantity("bits per byte", "bits/byte"),
    "perplexity": Quantity("perplexity", "exp of nats/token"),
    # per-token telemetry, one value per iteration
    "loss": Quantity("cross-entropy", "nats"),
    "kl_prev": Quantity("KL(p_{t-1} || p_t)", "nats"),
    "entropy": Quantity("entropy", "nats"),
    "rel_change": Quantity("relative latent change", "ratio"),
    "cos_prev": Quantity("cosine to the previous latent", "cosine"),
    "norm": Quantity("latent norm", "L2"),
    "correct": Quantity("token accuracy", "fraction of scored tokens"),
}
DEPTH = "depth n (iterations)"
ITERATION = "iteration t (depth, iterations)"
MEAN_DEPTH = "mean exit depth (iterations)"
POSITION = "token position (index in the row)"
STEP = "training step"


def quantity(key: str) -> Quantity:
    """The key's quantity; an unlisted key is its own name, unit unknown (a plot never fails on a label)."""
    return QUANTITIES.get(key, Quantity(key, "unit unknown"))


def axis_label(keys: Iterable[str]) -> str:
    """One axis label for the quantities drawn on it: names grouped by their unit."""
    by_unit: dict[str, list[str]] = {}
    for k in keys:
        q = quantity(k)
        names = by_unit.setdefault(q.unit, [])
        if q.name not in names:
            names.append(q.name)
    return "; ".join(f"{', '.join(names)} ({unit})" for unit, names in by_unit.items())
