"""Evaluation at a list of depths: the one implementation used by training and asura.analysis.

Metric names (one meaning everywhere: metrics.jsonl, TensorBoard, sweeps, reports, analysis):

    ce           cross-entropy of the FINAL iteration's logits, mean over scored tokens
    accuracy     argmax accuracy of the final iteration over scored tokens
    exact_match  fraction of examples (row, segment) whose every scored target is right
    objective    the training objective: guidance-weighted CE over iterations + z-loss;
                 comparable only between runs with the same guidance and z_loss
    z_loss       the objective's z-loss term

Every depth runs through ONE compiled program: n is traced and the loop length is
asura.depth.scan_length(max(depths)), so a sweep over depths compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asura.config import Config

TOKEN_METRICS = ("ce", "accuracy", "objective", "z_loss")  # token-weighted means over batches


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
