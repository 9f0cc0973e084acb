"""Depth rule and schedules (asura.depth): deterministic in (seed, step), in bounds, sampled
frequencies match depth_distribution, and config validation agrees with the run-time rule."""

import dataclasses

import numpy as np
import pytest
from conftest import tiny_config

from asura.config.schema import Config, DepthConfig, ModelConfig, TrainConfig
from asura.depth import depth_distribution, grad_iterations, max_train_depth, sample_depth


def cfg_for(schedule, iterations=3, max_it=6, dmin=1, dmax=0, sigma=0.5, seed=0):
    return Config(
        model=ModelConfig(iterations=iterations, max_iterations=max_it),
        depth=DepthConfig(schedule=schedule, min=dmin, max=dmax, sigma=sigma),
        train=TrainConfig(seed=seed),
    )


CASES = [
    cfg_for("fixed"),
    cfg_for("uniform", dmin=2),
    cfg_for("uniform", dmin=1, dmax=4),
    cfg_for("poisson_lognormal", iterations=3, max_it=8),
    cfg_for("poisson_lognormal", iterations=4, max_it=5, sigma=1.0),  # heavy clipping at the cap
    cfg_for("poisson_lognormal", iterations=1, max_it=4),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.depth.schedule}-{c.model.iterations}-{c.depth.max}")
def test_schedule_deterministic_bounded_and_matches_pmf(cfg):
    draws = np.array([sample_depth(cfg, s) for s in range(6000)])
    again = np.array([sample_depth(cfg, s) for s in range(6000)])
    np.testing.assert_array_equal(draws, again)  # pure function of (seed, step)
    other = dataclasses.replace(cfg, train=TrainConfig(seed=cfg.train.seed + 1))
    if len(set(draws)) > 1:
        assert any(sample_depth(other, s) != d for s, d in enumerate(draws[:50]))
    cap = cfg.depth.max or cfg.model.max_iterations  # every case has iterations <= max_iterations
    assert max_train_depth(cfg) == cap
    assert draws.min() >= 1 and draws.max() <= cap
    pmf = depth_distribution(cfg)
    assert abs(sum(pmf.values()) - 1) < 1e-9
    assert all(1 <= k <= cap and p >= 0 for k, p in pmf.items())
    for k in range(1, cap + 1):
        freq = np.mean(draws == k)
        p = pmf.get(k, 0.0)
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(draws)) + 1e-3, (k, freq, p)
    mean = sum(k * p for k, p in pmf.items())
    assert abs(draws.mean() - mean) < 0.05


def test_poisson_lognormal_mean_is_iterations_without_clipping():
    cfg = cfg_for("poisson_lognormal", iterations=4, max_it=64, sigma=0.5)
    pmf = depth_distribution(cfg)
    assert abs(sum(k * p for k, p in pmf.items()) - 4) < 1e-3


def test_uniform_pmf_and_grad_iterations():
    assert depth_distribution(cfg_for("uniform", dmin=2, dmax=5)) == {n: 0.25 for n in range(2, 6)}
    assert depth_distribution(cfg_for("fixed", iterations=2)) == {2: 1.0}
    assert [grad_iterations(5, k) for k in (0, 1, 3, 9)] == [5, 1, 3, 5]


def test_training_depth_past_max_iterations_validates_and_is_drawn():
    """Regression: with depth.max=0 the schedule's top is max(max_iterations, iterations) = 5.

    Validation used `depth.max or max_iterations` (= 3) and rejected depth.min=4 with
    "exceeds depth.max=3", while the schedules already clipped to 5: one rule, two answers.
    """
    cfg = tiny_config(
        "model.iterations=5",
        "model.max_iterations=3",
        "model.extrapolation=last",
        "depth.schedule=uniform",
        "depth.min=4",
    )  # must not raise
    assert max_train_depth(cfg) == 5
    assert depth_distribution(cfg) == {4: 0.5, 5: 0.5}
    draws = {sample_depth(cfg, s) for s in range(200)}
    assert draws == {4, 5}  # in [4, 5], and both ends are reached (P(miss one) = 2·2^-200)
