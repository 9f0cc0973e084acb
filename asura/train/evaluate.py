"""Evaluation at a list of depths: the one implementation used by training and asura.analysis.

Metric names (one meaning everywhere: metrics.jsonl, TensorBoard, sweeps, reports, analysis):

    ce           cross-entropy of the FINAL iteration's logits, mean over scored tokens
    accuracy     argmax accuracy of the final iteration over scored tokens
    exact_match  fraction of examples (row, segment) whose every scored target is right
    objective    the training objective: guidance-weighted CE over iterations + z-loss;
                 comparable only between runs with the same guidance and z_loss
    z_loss       the objective's z-loss term

Shown to a user (train.py's summary, the progress bar, eval lines, `asura.evaluate`): only the
metrics that fit the data source (`asura.data.sources.Source.shown`), read through `SHOWN`, which
adds two derived from ce:

    bits_per_byte  ce / ln 2, for byte-level text (one token per byte)
    perplexity     exp(ce) per scored token

Every depth runs through ONE compiled program: n is traced and the loop length is
asura.depth.scan_length(max(depths)), so a sweep over depths compiles once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from asura.config import Config
from asura.data.sources import SOURCES

TOKEN_METRICS = ("ce", "accuracy", "objective", "z_loss")  # token-weighted means over batches


@dataclass(frozen=True)
class Shown:
    """A metric as a user sees it: its short label, format, and how to read it from one depth's metrics."""

    label: str
    fmt: str
    value: Callable[[dict], float]


SHOWN = {
    "ce": Shown("ce", ".4f", lambda m: m["ce"]),
    "accuracy": Shown("acc", ".3f", lambda m: m["accuracy"]),
    "exact_match": Shown("em", ".3f", lambda m: m["exact_match"]),
    "bits_per_byte": Shown("bpb", ".4f", lambda m: m["ce"] / math.log(2)),
    "perplexity": Shown("ppl", ".4g", lambda m: math.exp(min(m["ce"], 700.0))),  # exp overflows past ~709
}


def shown_metrics(cfg: Config) -> tuple[str, ...]:
    """The metrics that mean something for cfg's data (asura.data.sources.Source.shown)."""
    return SOURCES[cfg.data.source].shown(cfg)


def shown_values(cfg: Config, metrics: dict) -> dict[str, float]:
    """{name: value} of the shown metrics, from one depth's {ce, accuracy, exact_match, ...}."""
    nan = float("nan")
    out = {}
    for name in shown_metrics(cfg):
        try:
            out[name] = SHOWN[name].value(metrics)
        except KeyError:
            out[name] = nan
    return out


def eval_step(model, batch: dict, n, max_depth: int):
    """(metrics, pred_BT) of one batch at depth n: token-mean scalars and final-iteration argmax."""
    objective, aux = model.loss(batch, n=n, bptt_k=0, max_depth=max_depth, with_pred=True)
    metrics = {"objective": objective, "ce": aux["ce"], "accuracy": aux["accuracy"], "z_loss": aux["z_loss"]}
    return {**metrics, "tokens": aux["tokens"]}, aux["pred"]


def evaluate_depths(
    step_fn: Callable,
    batches: Sequence[dict],
    depths: Sequence[int],
    exact_match: Callable,
    placed: Sequence[dict] | None = None,
    to_local: Callable = np.asarray,
) -> dict[int, dict[str, float]]:
    """{depth: {ce, accuracy, objective, z_loss, exact_match, tokens, examples}} over all batches.

    step_fn(batch, n) -> (metrics, pred_BT) with n a traced int32 (see `eval_step`). `batches` are
    host numpy batches (for exact match); `placed` the same on device (default: `batches`). With
    several processes, exact match counts this process's rows (token metrics are global).
    """
    placed = batches if placed is None else placed
    out: dict[int, dict[str, float]] = {}
    for n in depths:
        sums = dict.fromkeys(TOKEN_METRICS, 0.0)
        tokens = correct = examples = 0.0
        for host, dev in zip(batches, placed, strict=True):
            metrics, pred_BT = step_fn(dev, jnp.asarray(n, jnp.int32))
            metrics = jax.device_get(metrics)
            t = float(metrics["tokens"])
            tokens += t
            for k in TOKEN_METRICS:
                sums[k] += float(metrics[k]) * t
            c, e = exact_match(np.asarray(to_local(pred_BT)), host)
            correct, examples = correct + float(c), examples + float(e)
        res = {k: v / max(tokens, 1.0) for k, v in sums.items()}
        out[int(n)] = {**res, "exact_match": correct / max(examples, 1.0), "tokens": tokens, "examples": examples}
    return out


def flat_metrics(cfg: Config, by_depth: dict[int, dict[str, float]]) -> dict[str, float]:
    """eval/d{n}/{name} per depth, plus eval/{name} at the trained depth model.iterations."""
    out = {f"eval/d{n}/{k}": v for n, ms in by_depth.items() for k, v in ms.items()}
    out.update({f"eval/{k}": v for k, v in by_depth.get(cfg.model.iterations, {}).items()})
    return out
