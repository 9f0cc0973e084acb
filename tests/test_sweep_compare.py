"""Comparison labels on constructed manifests, and refusal of unlabelled mismatches."""

from __future__ import annotations

import pytest

from asura.sweep.compare import ComparisonRefused, compare, label
from asura.sweep.report import group_rows


def run(name, params, flops, value=1.0):
    return {"group": name, "params_unique": params, "train_flops": flops, "value": value}


REF = run("looped", 1_000_000, 3e12, 2.0)


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (run("iso_param", 1_009_000, 1e12), "iso-param"),  # +0.9% params, a third of the FLOPs
        (run("iso_flop", 2_000_000, 3.02e12), "iso-FLOP"),  # +0.67% FLOPs, twice the params
        (run("same", 995_000, 2.98e12), "iso-param+iso-FLOP"),
        (run("off", 1_011_000, 3.04e12), "neither"),  # +1.1% params, +1.3% FLOPs
    ],
)
def test_labels(other, expected):
    assert label(other, REF) == expected
    assert compare(other, REF)["label"] == expected


def test_claimed_kinds_that_hold_are_allowed():
    c = compare(run("iso_param", 1_009_000, 1e12, 2.5), REF, kind="iso-param")
    assert c["label"] == "iso-param" and c["delta"] == pytest.approx(0.5)
    assert compare(run("iso_flop", 2e6, 3.02e12), REF, kind="iso-FLOP")["flops_ratio"] == pytest.approx(3.02 / 3)
    assert compare(run("off", 5e6, 9e12), REF, kind="neither")["label"] == "neither"


@pytest.mark.parametrize(
    ("other", "kind", "needle"),
    [
        (run("big", 1_011_000, 3e12), "iso-param", "not iso-param: unique params differ by +1.10%"),
        (run("vanilla", 1_000_000, 1e12), "iso-FLOP", "not iso-FLOP: training FLOPs differ by -66.67%"),
        ({"group": "bare", "value": 1.0}, None, "bare has no accounting"),
        (run("x", 1e6, 3e12), "iso-params", "unknown comparison kind"),
    ],
)
def test_refuses_unlabelled_mismatch(other, kind, needle):
    with pytest.raises(ComparisonRefused) as e:
        compare(other, REF, kind=kind)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_iso_param_compares_trained_params_when_both_runs_have_them():
    """A looped model's untrained slots (asura.flops: trained) do not count; with only one run
    recording the trained count, both are compared on unique params (one quantity for both)."""
    looped = {**REF, "params_unique": 1_090_000, "params_trained": 1_000_000}
    vanilla = {**run("iso_param", 1_005_000, 1e12), "params_trained": 1_005_000}
    assert label(vanilla, looped) == "iso-param"
    assert label(run("iso_param", 1_005_000, 1e12), looped) == "neither"  # 1.005M vs 1.09M unique
    with pytest.raises(ComparisonRefused, match=r"trained params differ by \+9\.00%"):
        compare({**vanilla, "params_trained": 1_090_000}, looped, kind="iso-param")


def _m(group, role, parent, seed, params, flops, value, trial):
    acc = {"flops_per_token_fwd": 1.0, "flops_per_token_train": 3.0, "train_tokens": 100}
    return {"trial": trial, "key": f"{group}|seed={seed}", "group": group, "role": role, "parent": parent,
            "seed": seed, "status": "complete", "metric": "ce", "value": value, "params_unique": params,
            "train_flops": flops, "expected_depth": 1.0, "bptt_k": 0, **acc}  # fmt: skip


def test_table_rows_labelled_against_their_reference():
    ms = [
        _m("looped", "trial", None, 0, 1000, 3e9, 2.0, 0),
        _m("looped", "trial", None, 1, 1000, 3e9, 2.2, 1),
        _m("no_inject", "trial", None, 0, 995, 2.9e9, 2.5, 2),
        _m("iso_flop_depth(looped)", "iso_flop_depth", "looped", 0, 2000, 3.01e9, 2.1, 3),
        _m("iso_param(no_inject)", "iso_param", "no_inject", 0, 992, 1e9, 2.6, 4),
    ]
    rows = {r["group"]: r for r in group_rows(ms, {"groups": ["looped", "no_inject"]})}
    assert rows["looped"]["label"] == "reference" and rows["looped"]["value"] == pytest.approx(2.1)
    assert rows["looped"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["no_inject"]["label"] == "iso-param" and rows["no_inject"]["reference"] == "looped"
    assert rows["iso_flop_depth(looped)"]["label"] == "iso-FLOP"
    # A baseline is compared with the looped group it came from, not with the first group.
    assert rows["iso_param(no_inject)"]["reference"] == "no_inject"
    assert rows["iso_param(no_inject)"]["label"] == "iso-param"
    named = {r["group"]: r for r in group_rows(ms, {"groups": ["looped"], "reference": "no_inject"})}
    assert named["iso_flop_depth(looped)"]["reference"] == "no_inject" and named["looped"]["label"] == "iso-param"
