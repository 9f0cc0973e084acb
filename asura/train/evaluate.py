"""Periodic evaluation: loss + answer exact-match at the trained depth and over a depth sweep."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asura.config import Config


def eval_depths(cfg: Config) -> list[int]:
    """train.eval_depths, or 1..max_iterations; the trained depth is always included."""
    depths = list(cfg.train.eval_depths) or list(range(1, cfg.model.max_iterations + 1))
    if cfg.model.iterations not in depths:
        depths.append(cfg.model.iterations)
    return sorted(set(depths))


def evaluate(
    cfg: Config,
    eval_fn: Callable,
    params,
    batches: Sequence[dict],
    placed: Sequence[dict],
    exact_match: Callable,
    depths: Sequence[int],
    to_local: Callable = np.asarray,
) -> dict[str, float]:
    """Flat metrics: eval/d{n}/{loss,ce,accuracy,exact_match} per depth, plus eval/{...} at the trained depth.

    `batches` are host numpy batches (for exact_match); `placed` the same on device.
    Loss-like metrics are token-weighted means over batches; with several processes, exact
    match is over this process's rows (losses are global).
    """
    out: dict[str, float] = {}
    for n in depths:
        n_arr = jnp.asarray(n, jnp.int32)
        sums: dict[str, float] = {}
        tokens = correct = examples = 0.0
        for host, dev in zip(batches, placed):
            metrics, pred_BT = eval_fn(params, dev, n_arr)
            metrics = jax.device_get(metrics)
            pred_BT = to_local(pred_BT)  # this process's rows (multi-host: the global array is not addressable)
            t = float(metrics.get("tokens", 1.0))
            tokens += t
            for k, v in metrics.items():
                if k != "tokens" and np.ndim(v) == 0:
                    sums[k] = sums.get(k, 0.0) + float(v) * t
            c, e = exact_match(np.asarray(pred_BT), host)
            correct, examples = correct + float(c), examples + float(e)
        for k, v in sums.items():
            out[f"eval/d{n}/{k}"] = v / max(tokens, 1.0)
        out[f"eval/d{n}/exact_match"] = correct / max(examples, 1.0)
    trained = cfg.model.iterations
    for k in [k for k in out if k.startswith(f"eval/d{trained}/")]:
        out["eval/" + k.split("/", 2)[2]] = out[k]
    return out
