"""Derived vanilla baselines for a looped config, each a complete validated Config.

The vanilla rule: switch off everything that makes the model loop (injection=none,
iter_norm/post_norm off, adapter=none, guidance=none, iterations=max_iterations=1, fixed
depth, full backprop) and keep everything else (qk_norm, z_loss, norm type, MLP kind,
tied embeddings, vocabulary, heads, data, optimiser), so only looping differs.

* iso_param: same width; n_layers solved (nearest integer) so trained params are within 1% (a
  vanilla model trains all it holds; slots the looped schedule never reaches are not counted).
  If no layer count gets there, n_layers = floor(solution) (>= 1) and d_ff is solved instead,
  rounded to a multiple of 8. Otherwise ``BaselineImpossible``.
* iso_flop_depth: n_layers = L · round(E[n]) at the same width (depth-matched). Exact only
  when E[n] is an integer and the loop extras (projection, adapters, guidance heads, bptt) are
  off; the reported ratio says how far off it is.
* iso_flop_width: n_layers = L; d_model chosen over multiples of n_heads·8 (head dim a
  multiple of 8, so even for RoPE) as the width nearest the training FLOPs/token (d_ff scaled
  with it: an explicit d_ff in proportion, d_ff=0 at its automatic ratio); then d_ff is tuned in
  multiples of 8 (FLOPs are linear in d_ff at fixed width) until training FLOPs/token are within
  ``FLOP_TOL``. Otherwise ``BaselineImpossible``.
* token_matched: the looped model's shared stack unrolled once (n_layers = L, same width),
  trained for round(train.steps · E[n]) steps: about the same total training FLOPs, n× the tokens.

``BASELINES`` lists the kinds once, each with its facts (builder, what it matches, tolerance,
whether ``baselines: true`` includes it, its report line); the sweep spec, its errors and
``report`` (``python -m asura.flops``) read the names from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from asura.config.load import config_to_dict, with_overrides
from asura.config.schema import Config
from asura.flops import expected_depth, flop_count, param_count, summary
from asura.registry import Registry

# One tolerance per comparison kind (docs/method.md: "iso-param or iso-FLOP, within 1%"), read
# both by the builders here and by the labeller (asura.sweep.compare): every baseline built to its
# tolerance is labelled its kind in a sweep's tables, and nothing looser is ever called iso-*.
PARAM_TOL = 0.01  # trained parameters
FLOP_TOL = 0.01  # training FLOPs (per token here; per token × tokens in compare, tokens being equal)
TOLERANCES = {"iso-param": PARAM_TOL, "iso-FLOP": FLOP_TOL}  # keyed by asura.sweep.compare's label


class BaselineImpossible(ValueError):
    """No baseline of this kind meets its tolerance; the message is one line saying why."""


def vanilla(cfg: Config, **model_overrides) -> Config:
    overrides = {
        "name": f"{cfg.name}-vanilla",
        "model.injection": "none",
        "model.loop_start": "embed",  # no loop: h_0 = e is the vanilla model's input
        "model.exit_gate": False,
        "model.exit_entropy": 0.0,
        "model.exit_gate_loss": "expected",
        "model.exit_gate_k": 50.0,
        "model.exit_gate_gamma": 0.005,
        "model.iter_norm": False,
        "model.post_norm": False,
        "model.adapter": "none",
        "model.guidance": "none",
        "model.guidance_weights": [],
        "model.iterations": 1,
        "model.max_iterations": 1,
        "depth.schedule": "fixed",
        "depth.min": 1,
        "depth.max": 0,
        "depth.bptt_k": 0,
        "depth.halt_rule": "",  # a vanilla model has one iteration: nothing to halt
        "depth.halt_threshold": 0.0,
        "depth.halt_from": 0,
        "depth.halt_kv": "copy",
        "depth.halt_gate_loss": False,
        "train.init_from": "",  # a baseline trains from scratch: its shapes are not the looped run's
        "train.trainable": "all",  # a vanilla model has no gate to train alone
        "train.eval_depths": [],
    }
    overrides.update({f"model.{k}": v for k, v in model_overrides.items()})
    return with_overrides(cfg, overrides)


def _fast(cfg: Config, **model) -> Config:
    """Unvalidated model tweak for inner search loops; the result is validated by `vanilla`."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def _rel(x: float, target: float) -> float:
    return x / target - 1.0


def iso_param(cfg: Config) -> Config:
    target = param_count(cfg).trained
    base = vanilla(cfg, n_layers=1)
    pc = param_count(base)
    outer, block = pc.unique - pc.block, pc.block
    exact = (target - outer) / block
    layers = max(1, round(exact))
    if abs(_rel(outer + layers * block, target)) <= PARAM_TOL:
        return vanilla(cfg, n_layers=layers).replace(name=f"{cfg.name}-iso_param")
    # No integer depth is close enough: fix the depth and solve the MLP width (params linear in d_ff).
    layers = max(1, math.floor(exact))
    mlp_mats = 3 if base.model.mlp == "swiglu" else 2
    per_ff = layers * mlp_mats * base.model.d_model
    block_no_mlp = block - mlp_mats * base.model.d_model * base.model.ff_dim
    ff = round((target - outer - layers * block_no_mlp) / per_ff / 8) * 8
    if ff < 8:
        raise BaselineImpossible(f"iso_param: {layers} layer(s) already exceed {target} params at d_ff=8")
    out = vanilla(cfg, n_layers=layers, d_ff=ff).replace(name=f"{cfg.name}-iso_param")
    err = _rel(param_count(out).trained, target)
    if abs(err) > PARAM_TOL:
        raise BaselineImpossible(
            f"iso_param: best is {layers} layers, d_ff={ff}, {err:+.2%} params (tolerance {PARAM_TOL:.0%})"
        )
    return out


def iso_flop_depth(cfg: Config) -> Config:
    n = max(1, math.floor(expected_depth(cfg) + 0.5))  # half rounds up
    return vanilla(cfg, n_layers=cfg.model.n_layers * n).replace(name=f"{cfg.name}-iso_flop_depth")


def iso_flop_width(cfg: Config) -> Config:
    m = cfg.model
    target = flop_count(cfg).train
    step = m.n_heads * 8
    base = vanilla(cfg)

    def at(width: int, ff: int | None = None) -> Config:
        if ff is None:  # d_ff scaled with the width: explicit in proportion, automatic at its ratio
            ff = 8 * max(1, round(m.d_ff * width / m.d_model / 8)) if m.d_ff else 0
        return _fast(base, d_model=width, d_ff=ff)

    def err(c: Config) -> float:
        return _rel(flop_count(c).train, target)

    def tune(width: int) -> tuple[int, float]:
        """The d_ff (multiple of 8, >= 8) whose FLOPs are nearest the target at this width."""
        ff0 = at(width).model.ff_dim
        f0 = flop_count(at(width, ff0)).train
        slope = (flop_count(at(width, ff0 + 8)).train - f0) / 8  # FLOPs are linear in d_ff
        lo = 8 * math.floor((ff0 + (target - f0) / slope) / 8)
        return min(((ff, err(at(width, ff))) for ff in {max(8, lo), max(8, lo + 8)}), key=lambda x: abs(x[1]))

    below, width = None, step
    while err(at(width)) <= 0:  # FLOPs grow monotonically with width: stop at the first one past the target
        below, width = width, width + step
    # The width grid alone moves FLOPs in steps of several percent on small models (the demo's nearest
    # width is +1.75%); d_ff in steps of 8 moves them in small linear steps. The bracketing width
    # nearest the target goes first; the other one can still get there (more d_ff, or less).
    widths = sorted((w for w in (below, width) if w is not None), key=lambda w: abs(err(at(w))))
    tried = []
    for w in widths:
        ff, e = tune(w)
        if abs(e) <= FLOP_TOL:
            return vanilla(cfg, d_model=w, d_ff=ff).replace(name=f"{cfg.name}-iso_flop_width")
        tried.append(f"d={w}, d_ff={ff}: {e:+.2%}")
    raise BaselineImpossible(
        f"iso_flop_width: no width in multiples of {step} with d_ff in multiples of 8 is within {FLOP_TOL:.0%} "
        f"of the training FLOPs/token; nearest: {'; '.join(tried)}"
    )


def iso_flop_depth_steps(cfg: Config) -> Config:
    """The depth-matched model trained for as many steps as make its run's training FLOPs equal the
    looped run's (depth-matched alone is 0.75x on the demo): iso-FLOP by steps, not by shape."""
    base = iso_flop_depth(cfg)
    steps = max(1, round(cfg.train.steps * flop_count(cfg).train / flop_count(base).train))
    out = with_overrides(base, {"train.steps": steps, "name": f"{cfg.name}-iso_flop_depth_steps"})
    err = _rel(summary(out)["train_flops"], summary(cfg)["train_flops"])
    if abs(err) > FLOP_TOL:
        raise BaselineImpossible(f"iso_flop_depth_steps: {steps} steps give {err:+.2%} run FLOPs (tol {FLOP_TOL:.0%})")
    return out


def token_matched(cfg: Config) -> Config:
    steps = max(1, math.floor(cfg.train.steps * expected_depth(cfg) + 0.5))
    out = with_overrides(vanilla(cfg), {"train.steps": steps, "name": f"{cfg.name}-token_matched"})
    return out


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Baseline:
    """One baseline kind and its facts; `check` is the one-line summary of how well it matched."""

    build: Callable[[Config], Config]  # looped config -> vanilla config; raises BaselineImpossible
    matches: str  # what is held equal to the looped model
    tolerance: float | None  # relative tolerance `build` enforces; None = not enforced, only reported
    default: bool  # part of `baselines: true` / `--baselines`
    check: Callable[[Config, Config], str]  # (looped, baseline) -> one line for reports


BASELINES: Registry[Baseline] = Registry("baselines", "vanilla baselines derived from a looped config")


def _train_flops_ratio(cfg: Config, base: Config) -> float:
    return _rel(flop_count(base).train, flop_count(cfg).train)


def _check_iso_param(cfg: Config, base: Config) -> str:
    return f"trained params {_rel(param_count(base).trained, param_count(cfg).trained):+.2%} (tol {PARAM_TOL:.0%}): ok"


def _check_iso_flop_depth(cfg: Config, base: Config) -> str:
    e = expected_depth(cfg)
    exact = "exact depth" if float(e).is_integer() else f"inexact: E[n]={e:.3g}"
    return f"L={base.model.n_layers} ({exact}); train FLOPs {_train_flops_ratio(cfg, base):+.2%}"


def _check_iso_flop_width(cfg: Config, base: Config) -> str:
    m = base.model
    return f"train FLOPs {_train_flops_ratio(cfg, base):+.2%} (tol {FLOP_TOL:.0%}): ok, d={m.d_model}, d_ff={m.d_ff}"


def _check_iso_flop_depth_steps(cfg: Config, base: Config) -> str:
    runs = _rel(summary(base)["train_flops"], summary(cfg)["train_flops"])
    return f"L={base.model.n_layers}, steps {cfg.train.steps}->{base.train.steps}; run FLOPs {runs:+.2%} (tol 1%): ok"


def _check_token_matched(cfg: Config, base: Config) -> str:
    runs = summary(base)["train_flops"] / summary(cfg)["train_flops"]
    return f"steps {cfg.train.steps}->{base.train.steps}; run FLOPs x{runs:.3f}"


BASELINES.add(
    "iso_param",
    Baseline(iso_param, "trained parameters (depth, else d_ff, solved)", PARAM_TOL, True, _check_iso_param),
)
BASELINES.add(
    "iso_flop_depth",
    Baseline(
        iso_flop_depth, "training FLOPs/token via depth L·round(E[n]), same width", None, True, _check_iso_flop_depth
    ),
)
BASELINES.add(
    "iso_flop_depth_steps",
    Baseline(
        iso_flop_depth_steps,
        "training FLOPs of the run: depth L·round(E[n]), steps scaled",
        FLOP_TOL,
        False,
        _check_iso_flop_depth_steps,
    ),
)
BASELINES.add(
    "iso_flop_width",
    Baseline(
        iso_flop_width, "training FLOPs/token via width then d_ff, depth L", FLOP_TOL, True, _check_iso_flop_width
    ),
)
BASELINES.add(
    "token_matched",
    # Not a default: it changes train.steps, so it answers "same compute, more data", not "same budget".
    Baseline(token_matched, "total training FLOPs via steps round(steps·E[n])", None, False, _check_token_matched),
)
DEFAULT_BASELINES = tuple(name for name, b in BASELINES.items() if b.default)


def report(cfg: Config) -> dict:
    """{model, <each registered baseline>} -> numbers + full config (or {"impossible": reason})."""
    out = {"model": {**summary(cfg), "config": config_to_dict(cfg)}}
    for kind, b in BASELINES.items():
        try:
            base = b.build(cfg)
        except BaselineImpossible as e:
            out[kind] = {"impossible": str(e)}
            continue
        out[kind] = {**summary(base), "check": b.check(cfg, base), "config": config_to_dict(base)}
    return out
