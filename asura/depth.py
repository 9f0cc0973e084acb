"""Depth: the one rule for loop lengths, and the train-time depth schedules.

Pure python + numpy (no JAX, no Flax). Config validation, the model, the train step,
evaluation, analysis and the FLOP accountant all read depths through this module, so
"how long is the loop" has a single answer.

Terms
    n                  depth: iterations one forward pass runs (a traced int in the model)
    M                  model.max_iterations: length of the per-iteration parameter axis
    max_train_depth    the largest depth the training schedule can draw:
                       depth.max, or max(M, model.iterations) when depth.max = 0
    scan_length        S = max(M, *depths): the static loop length of the one compiled
                       program that serves every depth in `depths` and every depth <= M.
                       Depths past M need model.extrapolation (last | cycle).
    eval_depths        the depths evaluation sweeps: train.eval_depths or 1..M, plus
                       the training depth model.iterations

Schedules are pure functions of (train.seed, step), so a resumed run sees the same
depths. Draws are clipped to [1, max_train_depth]. poisson_lognormal (Huginn-style),
with mean mu = model.iterations:
    tau ~ N(log(mu - 1) - sigma^2/2, sigma),   lambda = e^tau,   n = 1 + Poisson(lambda)
so E[lambda] = mu - 1 and E[n] = mu before clipping (mu = 1 gives n = 1 always).
`depth_distribution` is the exact pmf: closed form for fixed/uniform, Gauss–Hermite
quadrature over tau for poisson_lognormal, with the mass above the cap folded into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from asura.registry import Registry

if TYPE_CHECKING:  # the schema imports this module for its registry
    from asura.config.schema import Config, ModelConfig


class DepthError(ValueError):
    """A depth the model cannot run; one line naming the depth and the fix."""


# The deepest loop any entry point will run. Each iteration runs the whole shared stack, so cost is
# linear in depth and a typo (--depth 100000000) would otherwise run silently for hours. 1024 is
# hundreds of times any trained depth here; raise it in code if a study really needs more.
DEPTH_LIMIT = 1024


# ------------------------------------------------------------------ the depth rule


def max_train_depth(cfg: Config) -> int:
    """Largest depth the training schedule draws (the fixed schedule draws model.iterations)."""
    return cfg.depth.max or max(cfg.model.max_iterations, cfg.model.iterations)


def scan_length(model_cfg: ModelConfig, depths: Iterable[int] = ()) -> int:
    """Static loop length S serving every depth in `depths` (and all depths <= M) in one program."""
    depths = [int(d) for d in depths]
    if any(d < 1 for d in depths):
        raise DepthError(f"depths must be >= 1, got {depths}")
    if any(d > DEPTH_LIMIT for d in depths):
        raise DepthError(
            f"depth {max(depths)} is past the limit of {DEPTH_LIMIT} iterations (asura.depth.DEPTH_LIMIT): each "
            "iteration runs the whole block stack, so this would run for a very long time"
        )
    M = model_cfg.max_iterations
    beyond = sorted({d for d in depths if d > M})
    if beyond and model_cfg.extrapolation == "none":
        raise DepthError(
            f"depth {beyond[-1]} exceeds model.max_iterations={M} and model.extrapolation='none'; set "
            "model.extrapolation=last (reuse the final iteration's parameters) or cycle (slot t % max_iterations), "
            "or raise max_iterations"
        )
    return max([M, *depths])


def eval_depths(cfg: Config) -> list[int]:
    """train.eval_depths, or 1..max_iterations; the trained depth is always included."""
    depths = set(cfg.train.eval_depths or range(1, cfg.model.max_iterations + 1))
    return sorted(depths | {cfg.model.iterations})


def grad_iterations(n: int, bptt_k: int) -> int:
    """Iterations that carry parameter gradients under truncated backprop (the last k)."""
    return n if bptt_k <= 0 else min(n, bptt_k)


# -------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """A train-time depth schedule: a draw per step and its exact pmf."""

    doc: str
    draw: Callable[[Config, np.random.Generator], int]  # before clipping to [1, max_train_depth]
    pmf: Callable[[Config], dict[int, float]]


SCHEDULES: Registry[Schedule] = Registry("depth.schedule", "how the training depth is drawn at each step")


def _rng(cfg: Config, step: int) -> np.random.Generator:
    return np.random.default_rng([int(cfg.train.seed), int(step), 0x0A5A])


def _clip(cfg: Config, n: int) -> int:
    return int(min(max(n, 1), max_train_depth(cfg)))


def _lognormal_params(cfg: Config) -> tuple[float, float] | None:
    """(loc, sigma) of tau, or None when the mean depth is 1 (lambda = 0)."""
    mu = cfg.model.iterations
    if mu <= 1:
        return None
    s = cfg.depth.sigma
    return math.log(mu - 1) - s * s / 2, s


def _poisson_lognormal_draw(cfg: Config, rng: np.random.Generator) -> int:
    p = _lognormal_params(cfg)
    if p is None:
        return 1
    return 1 + int(rng.poisson(math.exp(rng.normal(p[0], p[1]))))


def _poisson_lognormal_pmf(cfg: Config) -> dict[int, float]:
    cap = max_train_depth(cfg)
    p = _lognormal_params(cfg)
    if p is None or cap == 1:
        return {1: 1.0}
    loc, s = p
    z, wz = np.polynomial.hermite_e.hermegauss(160)  # ∫ f(z) φ(z) dz ≈ Σ w f(z) / √(2π)
    lam = np.exp(loc + s * z)
    wz = wz / math.sqrt(2 * math.pi)
    pmf = {}
    for k in range(cap - 1):  # n = 1 + k
        logp = k * np.log(lam) - lam - math.lgamma(k + 1)
        pmf[1 + k] = float(np.sum(wz * np.exp(logp)))
    pmf[cap] = max(0.0, 1.0 - sum(pmf.values()))
    return pmf


def _uniform_pmf(cfg: Config) -> dict[int, float]:
    cap = max_train_depth(cfg)
    lo = min(cfg.depth.min, cap)
    return {n: 1.0 / (cap - lo + 1) for n in range(lo, cap + 1)}


SCHEDULES.add(
    "fixed",
    Schedule(
        "always model.iterations",
        draw=lambda cfg, rng: cfg.model.iterations,
        pmf=lambda cfg: {_clip(cfg, cfg.model.iterations): 1.0},
    ),
)
SCHEDULES.add(
    "uniform",
    Schedule(
        "uniform on [depth.min, max_train_depth]",
        draw=lambda cfg, rng: int(rng.integers(cfg.depth.min, max_train_depth(cfg) + 1)),
        pmf=_uniform_pmf,
    ),
)
SCHEDULES.add(
    "poisson_lognormal",
    Schedule(
        "1 + Poisson(lambda), log lambda ~ Normal (Huginn); mean model.iterations, spread depth.sigma",
        draw=_poisson_lognormal_draw,
        pmf=_poisson_lognormal_pmf,
    ),
)


def sample_depth(cfg: Config, step: int) -> int:
    """Depth for optimiser step `step`; deterministic in (train.seed, step)."""
    return _clip(cfg, SCHEDULES[cfg.depth.schedule].draw(cfg, _rng(cfg, step)))


def depth_distribution(cfg: Config) -> dict[int, float]:
    """Exact pmf {depth: probability} of `sample_depth` (sums to 1)."""
    return SCHEDULES[cfg.depth.schedule].pmf(cfg)


def expected_depth(cfg: Config) -> float:
    return sum(n * p for n, p in depth_distribution(cfg).items())
