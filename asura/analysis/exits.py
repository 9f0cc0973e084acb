"""Huginn-style per-token early-exit criteria, and their accuracy-vs-depth curves.

Inputs are telemetry arrays ``[B, T, n]`` (``asura.analysis.telemetry``); depths
are 1-based and the candidate depths of every criterion are 1..n (``pareto(..., n=)``
cuts the telemetry first, so every curve, the oracle's included, chooses among the
same depths). A token exits at the first iteration t whose criterion holds; a token
that never satisfies it runs to the full depth n.

- ``kl``: ``kl_prev[t] < threshold`` (KL(p_{t-1} || p_t), NaN at t=1 so t >= 2).
- ``entropy``: ``entropy[t] < threshold`` (can exit at t=1).
- ``latent``: ``rel_change[t] < threshold`` (NaN at t=1 unless h_0 was given).
- ``oracle``: each token's best depth in hindsight: the first t whose prediction is
  correct (n when none is, like every rule). Over the same candidate depths its token
  accuracy and exact match are at least every other rule's (a token any rule gets
  right is right at some t, and the oracle takes the first such t). An exit at "the
  first t that is correct and stays correct through n" is no upper bound: a token
  right at t=1 and wrong at n is lost, which a fixed depth 1 keeps.

Caveat: exits are simulated on one full-depth forward pass, so a token's later
positions attend to full-depth keys/values of earlier tokens even when those
exited early (asura.model.halting's kv=full); a real early-exit decoder differs. The
loop itself halts per token in asura.model.halting (rules: asura.model.exits), whose
kv=copy is what the KV-cached decoder computes: ``python -m asura.evaluate --exit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLD_CRITERIA = {"kl": "kl_prev", "entropy": "entropy", "latent": "rel_change"}
ORACLES = ("oracle",)


@dataclass(frozen=True)
class ExitCurve:
    """One criterion swept over thresholds: ``mean_depth[i]``, ``accuracy[i]`` at ``thresholds[i]``."""

    name: str
    thresholds: np.ndarray
    mean_depth: np.ndarray  # mean exit iteration over scored tokens
    accuracy: np.ndarray  # token accuracy over scored tokens at the exit iteration
    exact_match: np.ndarray | None = None  # per-example exact match, when a batch was given


def first_true(cond_BTN: np.ndarray) -> np.ndarray:
    """1-based index of the first True along the last axis; n where none is True -> ``[B, T]``."""
    cond_BTN = np.asarray(cond_BTN, bool)
    n = cond_BTN.shape[-1]
    return np.where(cond_BTN.any(-1), cond_BTN.argmax(-1) + 1, n).astype(np.int32)


def exit_depth(tel: dict[str, np.ndarray], criterion: str, threshold: float | None = None) -> np.ndarray:
    """Exit iteration ``[B, T]`` (1-based) of each token under one criterion."""
    if criterion in THRESHOLD_CRITERIA:
        if threshold is None:
            raise ValueError(f"exit criterion {criterion!r} needs a threshold")
        metric_BTN = tel[THRESHOLD_CRITERIA[criterion]]
        with np.errstate(invalid="ignore"):
            return first_true(metric_BTN < threshold)  # NaN < x is False: never exits on NaN
    if criterion not in ORACLES:
        valid = (*THRESHOLD_CRITERIA, *ORACLES)
        raise ValueError(f"unknown exit criterion {criterion!r}; valid: {', '.join(valid)}")
    return first_true(np.asarray(tel["correct"], bool))  # the oracle: first correct depth, else n


def at_depth(x_BTN: np.ndarray, depth_BT: np.ndarray) -> np.ndarray:
    """Gather ``x`` at each token's (1-based) exit iteration -> ``[B, T]``."""
    return np.take_along_axis(np.asarray(x_BTN), (np.asarray(depth_BT) - 1)[..., None], axis=-1)[..., 0]


def _point(tel, depth_BT, mask_BT, batch):
    m_BT = np.asarray(mask_BT) > 0
    count = max(int(m_BT.sum()), 1)
    mean_depth = float(np.where(m_BT, depth_BT, 0).sum() / count)
    acc = float(np.where(m_BT, at_depth(tel["correct"], depth_BT), False).sum() / count)
    em = None
    if batch is not None:
        from asura.data.packing import exact_match  # pure numpy; lazy so exits stays dependency-free

        n_ok, n_ex = exact_match(at_depth(tel["pred"], depth_BT), batch)
        em = n_ok / max(n_ex, 1)
    return mean_depth, acc, em


def exit_curve(
    tel: dict[str, np.ndarray],
    mask_BT,
    criterion: str,
    thresholds=None,
    batch: dict | None = None,
) -> ExitCurve:
    """Sweep a criterion's thresholds (ignored for oracles) -> an ``ExitCurve``.

    ``batch`` (with ``targets``, ``loss_mask``, ``segment_ids`` matching the
    telemetry's B and T) adds per-example exact match at the exit iteration.
    """
    if criterion in ORACLES:
        thresholds = [np.nan]
    elif thresholds is None:
        thresholds = default_thresholds(tel, criterion, mask_BT)
    pts = [_point(tel, exit_depth(tel, criterion, th), mask_BT, batch) for th in thresholds]
    em = np.array([p[2] for p in pts], float) if batch is not None else None
    return ExitCurve(
        criterion, np.asarray(thresholds, float), np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), em
    )


def fixed_depth_curve(tel: dict[str, np.ndarray], mask_BT, batch: dict | None = None) -> ExitCurve:
    """Baseline: every token stops at the same depth d = 1..n (no early exit)."""
    b, t, n = tel["correct"].shape
    pts = [_point(tel, np.full((b, t), d, np.int32), mask_BT, batch) for d in range(1, n + 1)]
    em = np.array([p[2] for p in pts], float) if batch is not None else None
    return ExitCurve(
        "fixed", np.arange(1, n + 1, dtype=float), np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), em
    )


def default_thresholds(tel: dict[str, np.ndarray], criterion: str, mask_BT=None, num: int = 17) -> np.ndarray:
    """Log-spaced thresholds spanning the finite positive range of the metric (on scored tokens when masked)."""
    x = np.asarray(tel[THRESHOLD_CRITERIA[criterion]], float)
    if mask_BT is not None:
        x = x[np.asarray(mask_BT) > 0]
    x = x[np.isfinite(x) & (x > 0)]
    if x.size == 0:
        return np.array([1e-6, 1.0])
    lo, hi = np.quantile(x, 0.01), np.quantile(x, 0.99) * 1.01
    return np.geomspace(max(lo, 1e-9), max(hi, lo * 10, 1e-8), num)


def upto(tel: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Telemetry of the first n iterations only: the candidate depths 1..n."""
    have = next(iter(tel.values())).shape[-1]
    if not 1 <= n <= have:
        raise ValueError(f"n={n}: the telemetry holds depths 1..{have}")
    return {k: v[..., :n] for k, v in tel.items()}


def pareto(
    tel: dict[str, np.ndarray],
    mask_BT,
    criteria=("kl", "entropy", "latent", "oracle"),
    thresholds: dict | None = None,
    batch: dict | None = None,
    n: int | None = None,
) -> list[ExitCurve]:
    """The fixed-depth baseline plus one curve per criterion (for ``plots.plot_exit_pareto``), every
    one choosing among depths 1..n (default: all the telemetry holds)."""
    if n is not None:
        tel = upto(tel, n)
    thresholds = thresholds or {}
    curves = [fixed_depth_curve(tel, mask_BT, batch)]
    curves += [exit_curve(tel, mask_BT, c, thresholds.get(c), batch) for c in criteria]
    return curves
