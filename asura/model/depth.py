"""Train-time depth schedules and truncated-backprop helpers.

Each schedule is a pure, host-side function of (train.seed, step): a resumed
run sees the same depths. Draws are clipped to [1, cap] where
cap = depth.max or model.max_iterations.

poisson_lognormal (Huginn-style), with mean μ = model.iterations:
    τ ~ N(log(μ − 1) − σ²/2, σ),   λ = e^τ,   n = 1 + Poisson(λ)
so E[λ] = μ − 1 and E[n] = μ before clipping (μ = 1 gives n = 1 always).
`depth_distribution` gives the exact pmf: closed form for fixed/uniform,
Gauss–Hermite quadrature over τ for poisson_lognormal, with the mass above
cap folded into cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from asura.config.schema import Config


def depth_cap(cfg: Config) -> int:
    """Largest training depth: depth.max, else max_iterations (or the training depth, if larger)."""
    return cfg.depth.max or max(cfg.model.max_iterations, cfg.model.iterations)


def scan_cap(model_cfg, depths) -> int | None:
    """Static scan length serving every depth in `depths` with one compiled program.

    None (= max_iterations) when they all fit; else max(depths), which needs
    model.extrapolation. Callers passing a traced n must pass this as the model's
    depth_cap: the model clips a traced n to its scan length, so without it a depth
    past max_iterations would silently run at max_iterations.
    """
    depths = [int(d) for d in depths]
    if not depths or min(depths) < 1:
        raise ValueError(f"depths must be positive integers, got {depths}")
    m = model_cfg.max_iterations
    beyond = sorted({d for d in depths if d > m})
    if not beyond:
        return None
    if model_cfg.extrapolation not in ("last", "cycle"):
        raise ValueError(
            f"depths {beyond} exceed model.max_iterations={m} but model.extrapolation={model_cfg.extrapolation!r}; "
            "run past the trained depth only with extrapolation='last' or 'cycle'"
        )
    return max(beyond)


def _rng(cfg: Config, step: int) -> np.random.Generator:
    return np.random.default_rng([int(cfg.train.seed), int(step), 0x0A5A])


def _clip(cfg: Config, n: int) -> int:
    return int(min(max(n, 1), depth_cap(cfg)))


def _fixed(cfg: Config, rng: np.random.Generator) -> int:
    return cfg.model.iterations


def _uniform(cfg: Config, rng: np.random.Generator) -> int:
    return int(rng.integers(cfg.depth.min, depth_cap(cfg) + 1))


def _lognormal_params(cfg: Config) -> tuple[float, float] | None:
    """(loc, sigma) of τ, or None when the mean depth is 1 (λ ≡ 0)."""
    mu = cfg.model.iterations
    if mu <= 1:
        return None
    s = cfg.depth.sigma
    return math.log(mu - 1) - s * s / 2, s


def _poisson_lognormal(cfg: Config, rng: np.random.Generator) -> int:
    p = _lognormal_params(cfg)
    if p is None:
        return 1
    lam = math.exp(rng.normal(p[0], p[1]))
    return 1 + int(rng.poisson(lam))


SCHEDULES: dict[str, Callable[[Config, np.random.Generator], int]] = {
    "fixed": _fixed,
    "uniform": _uniform,
    "poisson_lognormal": _poisson_lognormal,
}


def sample_depth(cfg: Config, step: int) -> int:
    """Depth for optimiser step `step`; deterministic in (train.seed, step)."""
    if cfg.depth.schedule not in SCHEDULES:
        raise ValueError(f"depth.schedule={cfg.depth.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return _clip(cfg, SCHEDULES[cfg.depth.schedule](cfg, _rng(cfg, step)))


def _poisson_lognormal_pmf(cfg: Config) -> dict[int, float]:
    cap = depth_cap(cfg)
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


def depth_distribution(cfg: Config) -> dict[int, float]:
    """Exact pmf {depth: probability} of `sample_depth` (sums to 1)."""
    cap = depth_cap(cfg)
    kind = cfg.depth.schedule
    if kind == "fixed":
        return {_clip(cfg, cfg.model.iterations): 1.0}
    if kind == "uniform":
        lo = min(cfg.depth.min, cap)
        return {n: 1.0 / (cap - lo + 1) for n in range(lo, cap + 1)}
    if kind == "poisson_lognormal":
        return _poisson_lognormal_pmf(cfg)
    raise ValueError(f"depth.schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")


def grad_iterations(n: int, bptt_k: int) -> int:
    """Iterations that carry parameter gradients under truncated backprop."""
    return n if bptt_k <= 0 else min(n, bptt_k)


def frozen(t, n, bptt_k):
    """True where step t runs under stop_gradient: t < n − k (k > 0). Traceable."""
    return (bptt_k > 0) & (t < n - bptt_k)
