"""Labelled comparisons between runs: iso-param, iso-FLOP, or neither.

A comparison is *iso-param* when trained parameters (``asura.flops``: what the optimiser holds,
less per-iteration slots no training step reaches; manifests from before that count have only
their unique count, which is then used for both runs) agree within ``TOLERANCES["iso-param"]``
and *iso-FLOP* when total training FLOPs (FLOPs/token × tokens) agree within
``TOLERANCES["iso-FLOP"]`` (1% each, docs/method.md); a pair can be both. Asking ``compare``
for a kind that does not hold raises ``ComparisonRefused`` with a one-line reason, so no table
or plot can present an unlabelled mismatch as a fair comparison.

The tolerances are ``asura.baselines``' own: a baseline is built to exactly the tolerance it is
labelled with here, so a width-matched baseline reads iso-FLOP, never "neither" by a gap
between two numbers.

Runs are manifests (or any mapping with ``params_trained`` or ``params_unique``, ``train_flops`` and ``value``).
"""

from __future__ import annotations

from collections.abc import Mapping

from asura.baselines import TOLERANCES

KINDS = ("iso-param", "iso-FLOP", "neither")


class ComparisonRefused(ValueError):
    """The requested comparison kind does not hold (or cannot be checked); one-line reason."""


def _name(run: Mapping) -> str:
    return str(run.get("group") or run.get("key") or run.get("name") or "run")


def _get(run: Mapping, key: str) -> float:
    v = run.get(key)
    if not isinstance(v, int | float) or v <= 0:
        raise ComparisonRefused(f"{_name(run)} has no accounting ({key}={v!r}); cannot label the comparison")
    return float(v)


def _param_key(a: Mapping, b: Mapping) -> str:
    """The same count for both runs: trained when both record it, else unique."""
    both = a.get("params_trained") is not None and b.get("params_trained") is not None
    return "params_trained" if both else "params_unique"


def rel_diff(a: float, b: float) -> float:
    """Relative difference of a against the reference b."""
    return a / b - 1.0


def kinds_holding(a: Mapping, b: Mapping) -> list[str]:
    out = []
    key = _param_key(a, b)
    if abs(rel_diff(_get(a, key), _get(b, key))) <= TOLERANCES["iso-param"]:
        out.append("iso-param")
    if abs(rel_diff(_get(a, "train_flops"), _get(b, "train_flops"))) <= TOLERANCES["iso-FLOP"]:
        out.append("iso-FLOP")
    return out


def label(a: Mapping, b: Mapping) -> str:
    """'iso-param', 'iso-FLOP', 'iso-param+iso-FLOP' or 'neither'."""
    return "+".join(kinds_holding(a, b)) or "neither"


def compare(a: Mapping, b: Mapping, kind: str | None = None) -> dict:
    """Compare run a against reference b; refuse when ``kind`` is claimed but does not hold.

    ``kind=None`` labels the comparison honestly; ``neither`` is always allowed (it claims nothing).
    """
    if kind is not None and kind not in KINDS:
        raise ComparisonRefused(f"unknown comparison kind {kind!r}; choose one of {', '.join(KINDS)}")
    holding = kinds_holding(a, b)
    key = _param_key(a, b)
    dp = rel_diff(_get(a, key), _get(b, key))
    df = rel_diff(_get(a, "train_flops"), _get(b, "train_flops"))
    if kind == "iso-param" and kind not in holding:
        raise ComparisonRefused(
            f"{_name(a)} vs {_name(b)} is not iso-param: {key.removeprefix('params_')} params differ by {dp:+.2%} "
            f"(tolerance {TOLERANCES[kind]:.0%})"
        )
    if kind == "iso-FLOP" and kind not in holding:
        raise ComparisonRefused(
            f"{_name(a)} vs {_name(b)} is not iso-FLOP: training FLOPs differ by {df:+.2%} "
            f"(tolerance {TOLERANCES[kind]:.0%})"
        )
    va, vb = a.get("value"), b.get("value")
    delta = va - vb if isinstance(va, int | float) and isinstance(vb, int | float) else None
    return {
        "a": _name(a),
        "b": _name(b),
        "label": "+".join(holding) or "neither",
        "kind": kind,
        "params_ratio": 1 + dp,
        "flops_ratio": 1 + df,
        "value_a": va,
        "value_b": vb,
        "delta": delta,
    }
