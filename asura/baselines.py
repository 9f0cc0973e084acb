"""Derived vanilla baselines for a looped config, each a complete validated Config.

The vanilla rule: switch off everything that makes the model loop (injection=none,
iter_norm/post_norm off, adapter=none, guidance=none, iterations=max_iterations=1, fixed
depth, full backprop) and keep everything else (qk_norm, z_loss, norm type, MLP kind,
tied embeddings, vocabulary, heads, data, optimiser), so only looping differs.

* iso_param: same width; n_layers solved (nearest integer) so unique params are within 1%.
  If no layer count gets there, n_layers = floor(solution) (>= 1) and d_ff is solved instead,
  rounded to a multiple of 8. Otherwise ``BaselineImpossible``.
* iso_flop_depth: n_layers = L · round(E[n]) at the same width (depth-matched). Exact only
  when E[n] is an integer and the loop extras (projection, adapters, guidance heads, bptt) are
  off; the reported ratio says how far off it is.
* iso_flop_width: n_layers = L; d_model solved over multiples of n_heads·8 (head dim a
  multiple of 8, so even for RoPE) so training FLOPs/token are within 2%. An explicit d_ff
  scales with the width (multiple of 8); d_ff=0 keeps its automatic ratio.
* token_matched: the looped model's shared stack unrolled once (n_layers = L, same width),
  trained for round(train.steps · E[n]) steps: about the same total training FLOPs, n× the tokens.
"""

from __future__ import annotations

import dataclasses
import math

from asura.config.load import config_to_dict, with_overrides
from asura.config.schema import Config
from asura.flops import expected_depth, flop_count, param_count, summary

PARAM_TOL = 0.01
FLOP_TOL = 0.02


class BaselineImpossible(ValueError):
    """No baseline of this kind meets its tolerance; the message is one line saying why."""


def vanilla(cfg: Config, **model_overrides) -> Config:
    overrides = {
        "name": f"{cfg.name}-vanilla",
        "model.injection": "none",
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
    target = param_count(cfg).unique
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
    err = _rel(param_count(out).unique, target)
    if abs(err) > PARAM_TOL:
        raise BaselineImpossible(f"iso_param: best is {layers} layers, d_ff={ff}, {err:+.2%} params (tolerance 1%)")
    return out


def iso_flop_depth(cfg: Config) -> Config:
    n = max(1, math.floor(expected_depth(cfg) + 0.5))  # half rounds up
    return vanilla(cfg, n_layers=cfg.model.n_layers * n).replace(name=f"{cfg.name}-iso_flop_depth")


def iso_flop_width(cfg: Config) -> Config:
    m = cfg.model
    target = flop_count(cfg).train
    step = m.n_heads * 8
    base = vanilla(cfg)

    def at(width: int) -> Config:
        ff = 8 * max(1, round(m.d_ff * width / m.d_model / 8)) if m.d_ff else 0
        return _fast(base, d_model=width, d_ff=ff)

    best, best_err, widths = None, math.inf, []
    width = step
    while True:  # FLOPs grow monotonically with width: stop once past the target
        err = _rel(flop_count(at(width)).train, target)
        widths.append((width, err))
        if abs(err) < abs(best_err):
            best, best_err = width, err
        if err > 0:
            break
        width += step
    if abs(best_err) > FLOP_TOL:
        near = ", ".join(f"d={w} ({e:+.1%})" for w, e in widths[-2:])
        raise BaselineImpossible(f"iso_flop_width: no width in multiples of {step} is within 2% of the FLOPs: {near}")
    chosen = at(best)
    return vanilla(cfg, d_model=chosen.model.d_model, d_ff=chosen.model.d_ff).replace(name=f"{cfg.name}-iso_flop_width")


def token_matched(cfg: Config) -> Config:
    steps = max(1, math.floor(cfg.train.steps * expected_depth(cfg) + 0.5))
    out = with_overrides(vanilla(cfg), {"train.steps": steps, "name": f"{cfg.name}-token_matched"})
    return out


BASELINES = {
    "iso_param": iso_param,
    "iso_flop_depth": iso_flop_depth,
    "iso_flop_width": iso_flop_width,
    "token_matched": token_matched,
}


def _check(kind: str, cfg: Config, base: Config) -> str:
    model_p, base_p = param_count(cfg).unique, param_count(base).unique
    model_f, base_f = flop_count(cfg).train, flop_count(base).train
    if kind == "iso_param":
        return f"params {_rel(base_p, model_p):+.2%} (tol 1%): ok"
    if kind == "iso_flop_width":
        return f"train FLOPs {_rel(base_f, model_f):+.2%} (tol 2%): ok, d={base.model.d_model}"
    if kind == "iso_flop_depth":
        e = expected_depth(cfg)
        exact = "exact depth" if float(e).is_integer() else f"inexact: E[n]={e:.3g}"
        return f"L={base.model.n_layers} ({exact}); train FLOPs {_rel(base_f, model_f):+.2%}"
    runs = summary(base)["train_flops"] / summary(cfg)["train_flops"]
    return f"steps {cfg.train.steps}->{base.train.steps}; run FLOPs x{runs:.3f}"


def report(cfg: Config) -> dict:
    """{model, iso_param, iso_flop_depth, iso_flop_width, token_matched} -> numbers + full config."""
    out = {"model": {**summary(cfg), "config": config_to_dict(cfg)}}
    for kind, fn in BASELINES.items():
        try:
            base = fn(cfg)
        except BaselineImpossible as e:
            out[kind] = {"impossible": str(e)}
            continue
        out[kind] = {**summary(base), "check": _check(kind, cfg, base), "config": config_to_dict(base)}
    return out
