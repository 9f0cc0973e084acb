"""Every axis of every analysis figure (what the notebooks draw) is labelled with its quantity and unit."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_analysis_helpers import make_sweep_dir

from asura.analysis import exits, plots, sweep_results, telemetry

UNIT = re.compile(r"\(.+\)")  # "cross-entropy (nats/token)", "depth n (iterations)"


def _telemetry():
    rng = np.random.default_rng(0)
    shape = (2, 6, 3)
    tel = {k: rng.random(shape) for k in ("kl_prev", "entropy", "rel_change", "loss", "norm", "cos_prev")}
    return {**tel, "correct": rng.random(shape) > 0.5, "pred": np.zeros(shape, int)}, np.ones((2, 6))


def _depth_results():
    return [{"depth": d, "ce": 1.0 / d, "accuracy": d / 7, "exact_match": d / 6, "extrapolated": d > 2}
            for d in range(1, 5)]  # fmt: skip


def _figures(tmp_path):
    """(name, figure) for every plot function, called as the notebooks call them."""
    tel, mask = _telemetry()
    results = _depth_results()
    curves = exits.pareto(tel, mask)
    res = sweep_results.read_sweep(make_sweep_dir(tmp_path))
    return {
        "plot_metric_vs_depth": [
            plots.plot_metric_vs_depth(results, ("ce",), 2, 2, title="CE"),
            plots.plot_metric_vs_depth(results, ("exact_match", "accuracy"), 2, 2, title="accuracy"),
        ],
        "plot_iteration_curves": [
            plots.plot_iteration_curves(telemetry.summary(tel, mask), ("loss", "kl_prev", "rel_change", "entropy"))
        ],
        "plot_convergence_heatmap": [
            plots.plot_convergence_heatmap(tel, "kl_prev", example=1),
            plots.plot_convergence_heatmap(tel, "loss", example=1, mask_BT=mask),
        ],
        "plot_exit_pareto": [plots.plot_exit_pareto(curves)],
        "plot_exit_depths": [
            plots.plot_exit_depths(
                np.array([[1, 2, 3], [3, 3, 1]]), np.array([[49, 43, 61], [50, 50, 10]]), rows=(0, 1)
            ),
            plots.plot_exit_depths(np.ones((1, 3)), np.zeros((1, 3), int), segment_ids_BT=np.array([[0, 1, 1]])),
        ],
        "plot_depth_curves": [
            sweep_results.plot_depth_curves(res, "ce"),
            sweep_results.plot_depth_curves(res, "exact_match"),
        ],
    }


def _labels(ax) -> list[str]:
    if ax.get_label() == "<colorbar>":  # a colorbar names its quantity along its one axis
        return [ax.get_ylabel() or ax.get_xlabel()]
    return [ax.get_xlabel(), ax.get_ylabel()]


def test_every_axis_is_labelled_with_units(tmp_path):
    built = _figures(tmp_path)
    # A new plot function must be added here, so it is checked too.
    assert {n for n in dir(plots) if n.startswith("plot_")} <= set(built)
    missing = []
    for name, figs in built.items():
        for fig in figs:
            for ax in fig.axes:
                missing += [f"{name}: axis {label!r}" for label in _labels(ax) if not UNIT.search(label)]
            plt.close(fig)
    assert not missing, missing


@pytest.mark.parametrize(("metric", "unit"), [("ce", "nats/token"), ("exact_match", "fraction of examples")])
def test_metric_axis_names_its_unit(metric, unit):
    fig = plots.plot_metric_vs_depth(_depth_results(), (metric,))
    assert unit in fig.axes[0].get_ylabel() and "iterations" in fig.axes[0].get_xlabel()
    plt.close(fig)
