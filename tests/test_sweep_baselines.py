"""The baselines registry: its facts hold for real configs, and the sweep spec reads names from it."""

from __future__ import annotations

import pytest
from test_sweep_helpers import REPO, write_spec

from asura.baselines import BASELINES, DEFAULT_BASELINES, TOLERANCES, Baseline, BaselineImpossible, report
from asura.config.load import load_config
from asura.flops import flop_count, param_count, summary
from asura.sweep.compare import label
from asura.sweep.manifest import accounting
from asura.sweep.spec import SpecError, load_spec

DEMO = REPO / "configs" / "demo.yaml"
BIG = REPO / "configs" / "presets" / "looped_350m.yaml"
# The comparison label each enforced baseline kind is built for.
LABEL_OF = {"iso_param": "iso-param", "iso_flop_width": "iso-FLOP", "iso_flop_depth_steps": "iso-FLOP"}


def test_registry_names_and_defaults():
    assert BASELINES.names == ("iso_param", "iso_flop_depth", "iso_flop_depth_steps", "iso_flop_width", "token_matched")
    assert all(isinstance(BASELINES[n], Baseline) for n in BASELINES)
    assert DEFAULT_BASELINES == ("iso_param", "iso_flop_depth", "iso_flop_width")  # token_matched changes steps
    assert {n: BASELINES[n].tolerance for n in BASELINES} == {
        "iso_param": 0.01, "iso_flop_depth": None, "iso_flop_depth_steps": 0.01, "iso_flop_width": 0.01,
        "token_matched": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="baselines='iso_parm' is not valid; choose one of iso_param, "):
        BASELINES["iso_parm"]


@pytest.mark.parametrize("over", [[], ["model.d_model=128", "model.n_layers=3"], ["model.mlp=swiglu"]])
def test_each_tolerance_is_what_the_builder_enforces(over):
    cfg = load_config(DEMO, over)
    measure = {
        "iso_param": lambda c: param_count(c).trained,
        "iso_flop_width": lambda c: flop_count(c).train,
        "iso_flop_depth_steps": lambda c: summary(c)["train_flops"],
    }  # the run's FLOPs: steps differ
    for name, b in BASELINES.items():
        if b.tolerance is None:
            continue
        try:
            base = b.build(cfg)
        except BaselineImpossible:
            continue
        assert abs(measure[name](base) / measure[name](cfg) - 1) <= b.tolerance, name


def test_report_has_one_entry_per_registered_baseline():
    rep = report(load_config(DEMO))
    assert list(rep) == ["model", *BASELINES.names]
    assert rep["iso_param"]["check"] == "trained params +0.28% (tol 1%): ok"  # the facts' tolerance, printed
    assert rep["iso_flop_width"]["check"] == "train FLOPs +0.00% (tol 1%): ok, d=128, d_ff=496"


def test_spec_baselines_true_means_the_registry_defaults(tmp_path):
    assert load_spec(write_spec(tmp_path, baselines=True)).baselines == DEFAULT_BASELINES
    assert load_spec(write_spec(tmp_path), baselines=True).baselines == DEFAULT_BASELINES
    assert load_spec(write_spec(tmp_path, baselines=["token_matched"])).baselines == ("token_matched",)
    with pytest.raises(SpecError, match="baselines has 'iso_parm'; did you mean 'iso_param'"):
        load_spec(write_spec(tmp_path, baselines=["iso_parm"]))


@pytest.mark.parametrize("kind", sorted(LABEL_OF))
def test_the_labeller_uses_the_builders_tolerance(kind):
    """One tolerance per kind: a pair just inside the builder's tolerance is labelled that kind, just outside not."""
    tol = BASELINES[kind].tolerance
    assert tol == TOLERANCES[LABEL_OF[kind]] == 0.01  # docs/method.md: "within 1%"
    key = {"iso-param": "params_unique", "iso-FLOP": "train_flops"}[LABEL_OF[kind]]
    ref = {"params_unique": 1e6, "train_flops": 1e12}
    for rel, labelled in ((0.99 * tol, True), (-0.99 * tol, True), (1.01 * tol, False), (-1.01 * tol, False)):
        run = {**{k: 3 * v for k, v in ref.items()}, key: ref[key] * (1 + rel)}  # the other quantity far off
        assert (label(run, ref) == LABEL_OF[kind]) is labelled, (kind, rel)


@pytest.mark.parametrize(
    ("path", "d_model", "d_ff"),
    [(DEMO, 128, 496), (BIG, 1920, 7816)],  # demo: width 128 alone is +1.75%; 350m: 1920 alone is -0.96%
)
def test_width_matched_baseline_reaches_one_percent_and_is_labelled_iso_flop(path, d_model, d_ff):
    cfg = load_config(path)
    base = BASELINES["iso_flop_width"].build(cfg)
    m = base.model
    assert (m.d_model, m.d_ff, m.n_layers) == (d_model, d_ff, cfg.model.n_layers)
    assert m.d_model % (8 * m.n_heads) == 0 and m.d_ff % 8 == 0
    assert abs(flop_count(base).train / flop_count(cfg).train - 1) <= 0.01
    # Same steps × batch × seq_len, so total training FLOPs agree too: the sweep labels the pair iso-FLOP.
    assert label(accounting(base), accounting(cfg)) == "iso-FLOP"


def test_width_matched_baseline_impossible_is_one_line():
    # 8 heads -> widths in steps of 64; even the narrowest, d=64 with d_ff=8, costs more than the looped model.
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=8", "model.vocab_size=4096", "model.iterations=2"])
    with pytest.raises(BaselineImpossible) as e:
        BASELINES["iso_flop_width"].build(cfg)
    msg = str(e.value)
    assert msg.startswith("iso_flop_width: no width in multiples of 64 with d_ff in multiples of 8 is within 1%")
    assert "d=64, d_ff=8: +" in msg and "\n" not in msg


def test_depth_matched_by_steps_is_labelled_iso_flop():
    """Depth-matched spends 0.75x the demo's training FLOPs per token; trained 795 steps instead of
    600 it spends the same run FLOPs (within 1%) and the labeller calls the pair iso-FLOP."""
    cfg = load_config(DEMO)
    depth, steps = BASELINES["iso_flop_depth"].build(cfg), BASELINES["iso_flop_depth_steps"].build(cfg)
    ratio = flop_count(cfg).train / flop_count(depth).train
    assert steps.model == depth.model and steps.train.steps == round(600 * ratio) == 795
    assert label(accounting(depth), accounting(cfg)) == "neither"
    assert label(accounting(steps), accounting(cfg)) == "iso-FLOP"
