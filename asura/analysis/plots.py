"""Matplotlib helpers; each returns the Figure and never calls ``plt.show`` (Agg-safe, headless).

The backend is left alone: headless matplotlib falls back to Agg, and Jupyter keeps inline.
Every axis (colorbars included) is labelled with its quantity and unit from ``asura.analysis.units``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from asura.analysis import units

_ORACLE_STYLE = {"linestyle": "--", "marker": "*", "markersize": 10}


def _axes(ax, figsize=(5, 3.5)):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return fig, ax


def plot_metric_vs_depth(
    results: list[dict],
    metrics=("ce",),
    trained_depth: int | None = None,
    max_iterations: int | None = None,
    ax=None,
    title: str = "",
):
    """Lines of ``results[i][metric]`` against ``results[i]['depth']`` (from ``depth.evaluate_depths``).

    Vertical markers show the trained depth and the last per-iteration slice
    (depths right of it are extrapolation).
    """
    fig, ax = _axes(ax)
    depths = [r["depth"] for r in results]
    for m in metrics:
        ax.plot(depths, [r[m] for r in results], marker="o", label=m)
    if trained_depth is not None:
        ax.axvline(trained_depth, color="gray", linestyle=":", label=f"trained n={trained_depth}")
    if max_iterations is not None and max(depths) > max_iterations:
        ax.axvspan(max_iterations + 0.5, max(depths) + 0.5, color="orange", alpha=0.12, label="extrapolation")
    ax.set_xlabel(units.DEPTH)
    ax.set_ylabel(units.axis_label(metrics))
    ax.set_xticks(depths)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_iteration_curves(summary: dict[str, np.ndarray], keys=("loss", "kl_prev", "rel_change"), ax=None):
    """Per-iteration telemetry means (``telemetry.summary``) against iteration t, log-scaled y."""
    fig, ax = _axes(ax)
    for k in keys:
        y = np.asarray(summary[k], float)
        ax.plot(np.arange(1, len(y) + 1), y, marker="o", label=k)
    ax.set_yscale("log")
    ax.set_xlabel(units.ITERATION)
    ax.set_ylabel(f"mean over scored tokens, log scale: {units.axis_label(keys)}", fontsize=8)
    ax.legend(fontsize=8)
    return fig


def plot_convergence_heatmap(
    tel: dict[str, np.ndarray],
    key: str = "kl_prev",
    example: int = 0,
    mask_BT=None,
    log: bool = True,
    ax=None,
):
    """Heatmap ``[T, n]`` of one telemetry key for one row: tokens down, iterations across.

    With ``mask_BT`` only the scored positions are drawn (task answers).
    """
    x_TN = np.asarray(tel[key][example], float)
    rows = np.arange(x_TN.shape[0])
    if mask_BT is not None:
        keep = np.asarray(mask_BT[example]) > 0
        if keep.any():
            x_TN, rows = x_TN[keep], rows[keep]
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            x_TN = np.log10(np.where(x_TN > 0, x_TN, np.nan))
    fig, ax = _axes(ax, figsize=(4, max(2.5, min(8, 0.15 * len(rows) + 1.5))))
    im = ax.imshow(x_TN, aspect="auto", interpolation="nearest", cmap="viridis")
    n = x_TN.shape[1]
    ax.set_xticks(range(n), [str(t) for t in range(1, n + 1)])
    if len(rows) <= 32:
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=6)
    ax.set_xlabel(units.ITERATION)
    ax.set_ylabel(units.POSITION + (", scored only" if mask_BT is not None else ""))
    ax.set_title(f"{'log10 ' if log else ''}{key} (row {example})", fontsize=9)
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + units.axis_label([key]))
    return fig


def plot_exit_depths(depth_BT, tokens_BT, rows=(0,), segment_ids_BT=None, title: str = "exit depth per token", ax=None):
    """Heat map of the iterations each token ran under per-token halting (LoopResult.depth_BT), one
    line per row in ``rows``, each position labelled with its byte (padding, segment 0, left out)."""
    depth_RT = np.asarray(depth_BT, float)[list(rows)]
    tok_RT = np.asarray(tokens_BT)[list(rows)]
    if segment_ids_BT is not None:
        depth_RT = np.where(np.asarray(segment_ids_BT)[list(rows)] > 0, depth_RT, np.nan)
    T = depth_RT.shape[1]
    fig, ax = _axes(ax, figsize=(max(4, min(14, 0.28 * T + 1.5)), 0.5 * len(rows) + 1.6))
    im = ax.imshow(depth_RT, aspect="auto", interpolation="nearest", cmap="magma_r")
    if T <= 96:
        ax.set_xticks(range(T), [chr(t) if 32 <= t < 127 else "·" for t in tok_RT[0]], fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(units.POSITION + ", labelled with its byte (row " + str(rows[0]) + ")")
    ax.set_ylabel("batch row (index)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=units.MEAN_DEPTH.replace("mean exit depth", "exit depth"))
    return fig


def plot_exit_pareto(curves, ax=None, metric: str = "accuracy", title: str = "early-exit Pareto"):
    """Accuracy versus mean depth for each ``exits.ExitCurve`` (oracles as single stars)."""
    fig, ax = _axes(ax)
    for c in curves:
        y = getattr(c, metric)
        if y is None:
            continue
        order = np.argsort(c.mean_depth)
        style = _ORACLE_STYLE if c.name.startswith("oracle") else {"marker": "o", "markersize": 3}
        if c.name == "fixed":
            style = {"color": "black", "marker": "s", "markersize": 4}
        ax.plot(c.mean_depth[order], np.asarray(y)[order], label=c.name, **style)
    ax.set_xlabel(units.MEAN_DEPTH)
    ax.set_ylabel(units.axis_label([metric]))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
