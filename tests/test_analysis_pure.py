"""Pure analysis math on hand-built arrays: telemetry formulas, exit criteria, plots."""

import matplotlib
import numpy as np
import pytest

from asura.analysis import exits, plots, telemetry


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_telemetry(h_SBTD, W_DV, targets_BT, h0_BTD=None):
    """Direct, loop-per-iteration reference in float64."""
    h = h_SBTD.astype(np.float64)
    s = h.shape[0]
    out = {k: [] for k in telemetry.KEYS}
    prev_logp = None
    for t in range(s):
        prev = h0_BTD if t == 0 else h[t - 1]
        norm = np.linalg.norm(h[t], axis=-1)
        if prev is None:
            cos = rel = np.full(norm.shape, np.nan)
        else:
            cos = (h[t] * prev).sum(-1) / (norm * np.linalg.norm(prev, axis=-1))
            rel = np.linalg.norm(h[t] - prev, axis=-1) / np.linalg.norm(prev, axis=-1)
        logp = _log_softmax(h[t] @ W_DV)
        kl = np.full(norm.shape, np.nan) if prev_logp is None else (np.exp(prev_logp) * (prev_logp - logp)).sum(-1)
        pred = logp.argmax(-1)
        vals = (
            norm,
            cos,
            rel,
            kl,
            -(np.exp(logp) * logp).sum(-1),
            -np.take_along_axis(logp, targets_BT[..., None], -1)[..., 0],
            pred == targets_BT,
            pred,
        )
        for k, v in zip(telemetry.KEYS, vals, strict=True):
            out[k].append(v)
        prev_logp = logp
    return {k: np.stack(v, -1) for k, v in out.items()}


@pytest.mark.parametrize("with_h0", [False, True])
def test_telemetry_matches_numpy(with_h0):
    rng = np.random.default_rng(0)
    s, b, t, d, v = 4, 2, 5, 8, 11
    h_SBTD = rng.normal(size=(s, b, t, d)).astype(np.float32)
    W_DV = rng.normal(size=(d, v)).astype(np.float32)
    targets_BT = rng.integers(0, v, size=(b, t))
    h0_BTD = rng.normal(size=(b, t, d)).astype(np.float32) if with_h0 else None
    got = telemetry.telemetry(h_SBTD, lambda h: h @ W_DV, targets_BT, h0_BTD=h0_BTD)
    want = _numpy_telemetry(h_SBTD, W_DV.astype(np.float64), targets_BT, h0_BTD)
    for k in telemetry.KEYS:
        assert got[k].shape == (b, t, s), k
        np.testing.assert_allclose(got[k].astype(np.float64), want[k], rtol=2e-5, atol=2e-5, err_msg=k)
    assert np.isnan(got["kl_prev"][..., 0]).all()
    assert np.isnan(got["rel_change"][..., 0]).all() != with_h0


def test_telemetry_truncates_to_n():
    h_SBTD = np.random.default_rng(1).normal(size=(5, 1, 3, 4)).astype(np.float32)
    tel = telemetry.telemetry(h_SBTD, lambda h: h, np.zeros((1, 3), int), n=2)
    assert tel["norm"].shape == (1, 3, 2)
    with pytest.raises(ValueError, match="n=6"):
        telemetry.telemetry(h_SBTD, lambda h: h, np.zeros((1, 3), int), n=6)


def _tel(**arrays):
    """Telemetry dict with one row [1, T, n] per given key."""
    return {k: np.asarray(v, float if k != "correct" else bool)[None] for k, v in arrays.items()}


def test_threshold_exits_first_iteration_below():
    nan = np.nan
    tel = _tel(
        kl_prev=[[nan, 0.5, 0.01, 0.001], [nan, 0.001, 0.5, 0.5], [nan, 1.0, 1.0, 1.0]],
        entropy=[[0.01, 2.0, 2.0, 2.0], [3.0, 2.0, 0.05, 0.0], [3.0, 3.0, 3.0, 3.0]],
        rel_change=[[nan, 0.2, 0.05, 0.01], [nan, 0.5, 0.5, 0.02], [nan, nan, nan, nan]],
    )
    np.testing.assert_array_equal(exits.exit_depth(tel, "kl", 0.02), [[3, 2, 4]])
    np.testing.assert_array_equal(exits.exit_depth(tel, "kl", 1e-9), [[4, 4, 4]])  # never -> full depth
    np.testing.assert_array_equal(exits.exit_depth(tel, "entropy", 0.1), [[1, 3, 4]])
    np.testing.assert_array_equal(exits.exit_depth(tel, "latent", 0.1), [[3, 4, 4]])
    np.testing.assert_array_equal(exits.exit_depth(tel, "kl", np.inf), [[2, 2, 2]])  # NaN at t=1 never exits
    with pytest.raises(ValueError, match="threshold"):
        exits.exit_depth(tel, "kl")
    with pytest.raises(ValueError, match="unknown exit criterion 'bogus'"):
        exits.exit_depth(tel, "bogus", 0.1)


def test_oracle_exits_at_the_first_correct_depth():
    tel = _tel(correct=[[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(exits.exit_depth(tel, "oracle"), [[2, 1, 4, 1, 3]])  # never correct: n


def test_exit_curve_points():
    # Token 0 is right from t=2, token 1 from t=1, token 2 never (masked out: token 3).
    correct = [[0, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]]
    ent = [[2.0, 0.5, 0.1], [0.05, 0.05, 0.05], [3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]
    tel = _tel(correct=correct, entropy=ent, pred=np.zeros((4, 3)))
    mask_BT = np.array([[1, 1, 1, 0]])
    c = exits.exit_curve(tel, mask_BT, "entropy", thresholds=[1e-3, 0.2, 1.0])
    np.testing.assert_allclose(c.mean_depth, [3.0, (3 + 1 + 3) / 3, (2 + 1 + 3) / 3])
    np.testing.assert_allclose(c.accuracy, [2 / 3, 2 / 3, 2 / 3])
    oracle = exits.exit_curve(tel, mask_BT, "oracle")
    np.testing.assert_allclose([oracle.mean_depth[0], oracle.accuracy[0]], [(2 + 1 + 3) / 3, 2 / 3])
    fixed = exits.fixed_depth_curve(tel, mask_BT)
    np.testing.assert_allclose(fixed.mean_depth, [1, 2, 3])
    np.testing.assert_allclose(fixed.accuracy, [1 / 3, 2 / 3, 2 / 3])


def test_exit_curve_exact_match_with_batch():
    # Two examples (segments 1, 2) in one row; example 2 needs both answer tokens right.
    correct = np.array([[[1, 1], [0, 1], [1, 1]]], bool)
    targets_BT = np.array([[5, 6, 7]])
    pred = np.where(correct, targets_BT[..., None], 0)
    tel = {"correct": correct, "pred": pred, "entropy": np.zeros((1, 3, 2))}
    batch = {"targets": targets_BT, "loss_mask": np.ones((1, 3)), "segment_ids": np.array([[1, 2, 2]])}
    fixed = exits.fixed_depth_curve(tel, batch["loss_mask"], batch=batch)
    np.testing.assert_allclose(fixed.exact_match, [0.5, 1.0])


def _depth_results():
    """Records shaped as asura.analysis.depth.evaluate_depths returns them."""
    return [
        {"depth": d, "ce": 1.0 / d, "accuracy": d / 7, "exact_match": d / 6, "objective": 1.1 / d, "z_loss": 1e-4,
         "n_examples": 24, "extrapolated": d > 4}
        for d in range(1, 6)
    ]  # fmt: skip


def test_metric_vs_depth_default_reads_evaluate_depths_records():
    fig = plots.plot_metric_vs_depth(_depth_results())
    assert [line.get_label() for line in fig.axes[0].lines] == ["ce"]
    matplotlib.pyplot.close(fig)


def test_plots_return_figures():
    rng = np.random.default_rng(0)
    tel = {
        "kl_prev": rng.random((2, 6, 3)),
        "correct": rng.random((2, 6, 3)) > 0.5,
        "pred": np.zeros((2, 6, 3)),
        "entropy": rng.random((2, 6, 3)),
        "rel_change": rng.random((2, 6, 3)),
        "loss": rng.random((2, 6, 3)),
    }
    mask = np.ones((2, 6))
    results = _depth_results()
    figs = [
        plots.plot_metric_vs_depth(results, ("ce", "exact_match"), trained_depth=3, max_iterations=4),
        plots.plot_convergence_heatmap(tel, "kl_prev", example=1, mask_BT=mask),
        plots.plot_exit_pareto(exits.pareto(tel, mask)),
        plots.plot_iteration_curves(telemetry.summary(tel, mask)),
    ]
    for fig in figs:
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        matplotlib.pyplot.close(fig)
