"""Sweep spec validation: every bad spec is one line, before anything runs; CLI exits 2."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_sweep_helpers import fake_trial, write_spec

from asura.sweep import grid as grid_module
from asura.sweep import spec as spec_module
from asura.sweep.__main__ import main
from asura.sweep.grid import Grid
from asura.sweep.runner import run_sweep
from asura.sweep.search import ParamSpec, PrunerSpec, SearchSpec
from asura.sweep.spec import SpecError, load_spec


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"axis": {"model.injection": ["add"]}}, "unknown key 'axis'; did you mean 'axes'?"),
        ({"axes": {"model.injecton": ["add"]}}, "unknown config key 'model.injecton'"),
        ({"axes": {"modle.injection": ["add"]}}, "unknown config key 'modle.injection'"),
        ({"axes": {"model.injection": ["bogus"]}}, "trial injection=bogus seed=0: model.injection='bogus'"),
        ({"axes": {"model.injection": []}}, "axes.model.injection must be a non-empty list"),
        ({"variants": {"x": {"model.d_model": 30}}}, "trial x seed=0: model.n_heads=4 must divide"),
        ({"overrides": {"train.seed": 3}}, "seeds: [...]"),
        ({"seeds": [0, 0]}, "seeds has duplicates"),
        ({"metric": "eval_los"}, "metric='eval_los' is not valid; choose one of ce, exact_match, accuracy, objective"),
        ({"metric": "eval_loss"}, "metric='eval_loss' was renamed 'ce'"),
        ({"metric": "ce@"}, "the depth after @ must be a positive integer"),
        ({"metric": "ce@0"}, "the depth after @ must be a positive integer"),
        ({"pruner": {"percentile": 50, "warmup": 1}}, "pruner: unknown key 'warmup'"),
        ({"pruner": {"percentile": 150}}, "pruner.percentile must be in (0, 100)"),
        (
            {"search": {"method": "grid", "n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}},
            "search.method='grid' is not valid; choose one of random, tpe",
        ),
        (
            {"search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2, "step": 0}}}},
            "step must be > 0",
        ),
        ({"search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-2, "high": 1e-3}}}}, "must be < high"),
        ({"search": {"n_trials": 2, "params": {"model.injection": {"low": 0, "high": 1}}}}, "use choices"),
        ({"search": {"n_trials": 2, "params": {"model.injection": {"choices": ["add", "nope"]}}}}, "choice 'nope'"),
        ({"search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}, "seeds": [0, 1]}, "one seed"),
        ({"baselines": ["iso_parm"]}, "did you mean 'iso_param'?"),
        ({"baselines": "iso_param"}, "baselines must be true, false or a list of iso_param, iso_flop_depth"),
        ({"baselines": ["iso_param", "iso_param"]}, "baselines has duplicates"),
        ({"reference": "nope", "axes": {"model.injection": ["add"]}}, "reference='nope' is not a group"),
        ({"storage": "study.db"}, "SQLAlchemy URL"),
    ],
)
def test_bad_specs_raise_one_line(tmp_path, fields, needle):
    path = write_spec(tmp_path, **fields)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_missing_base_and_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("axes: {model.injection: [add]}\n")
    with pytest.raises(SpecError, match="missing `base:`"):
        load_spec(p)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    path = write_spec(tmp_path, axes={"model.injection": ["add", "bogus"]})
    with pytest.raises(SystemExit) as e:
        main([str(path), "--workdir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.injection='bogus'" in err
    assert not (tmp_path / "run").exists()  # nothing created before validation passed


def test_grid_cells_baselines_dedup_and_impossible(tmp_path):
    # Two looped variants that differ only in injection share identical vanilla baselines: deduplicated.
    path = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}}, seeds=[0, 1])
    spec = load_spec(path, baselines=True)
    cells, impossible = spec.grid.cells, spec.grid.impossible
    trials = [c for c in cells if c.role == "trial"]
    assert len(trials) == 4
    base = [c for c in cells if c.role != "trial"]
    # iso_flop_depth is the same 2-layer vanilla model for both variants: one run per seed, with an alias.
    depth = [c for c in base if c.role == "iso_flop_depth"]
    assert len(depth) == 2 and all(c.group == "iso_flop_depth(full)" for c in depth)
    assert all(c.aliases == ("iso_flop_depth(add)",) for c in depth)
    assert all(c.config.model.max_iterations == 1 and c.config.model.n_layers == 2 for c in depth)
    # iso_flop_width differs per variant (projconcat costs FLOPs that add does not): one per variant and seed.
    width = [c for c in base if c.role == "iso_flop_width"]
    assert sorted(c.key for c in width) == [f"iso_flop_width({v})|seed={s}" for v in ("add", "full") for s in (0, 1)]
    assert {c.role for c in base} == {"iso_flop_depth", "iso_flop_width"}
    # At d_model=32 no iso-param depth/d_ff fits: recorded, not skipped.
    groups = {i.group for i in impossible}
    assert groups == {"iso_param(full)", "iso_param(add)"}
    assert all(i.reason.startswith(i.role) for i in impossible)
    assert len({c.key for c in cells}) == len(cells)


def test_sections_are_typed(tmp_path):
    search = {"method": "random", "n_trials": 3, "seed": 7, "params": {
        "train.lr": {"low": "1e-4", "high": 1e-2, "log": True},
        "model.n_layers": {"low": 1, "high": 3, "step": 2},
        "model.injection": {"choices": ["projconcat", "add"]}}}  # fmt: skip
    spec = load_spec(write_spec(tmp_path, search=search, pruner={"percentile": 25}))
    assert spec.search == SearchSpec("random", 3, 7, (
        ParamSpec("train.lr", type="float", low=1e-4, high=1e-2, log=True),
        ParamSpec("model.n_layers", type="int", low=1, high=3, step=2),
        ParamSpec("model.injection", choices=("projconcat", "add")),
    ))  # fmt: skip
    assert spec.pruner == PrunerSpec(percentile=25.0, warmup_evals=1, startup_trials=2)
    assert spec.grid == Grid()  # a search has no grid
    assert load_spec(write_spec(tmp_path, pruner=None)).pruner is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.search.n_trials = 4


def test_grid_is_built_once_per_load(tmp_path, monkeypatch):
    """The grid lives on the spec: preparing, running and reporting never rebuild it."""
    calls = []
    real = spec_module.build_grid

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(spec_module, "build_grid", counting)
    monkeypatch.setattr(grid_module, "build_grid", counting)
    path = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}}, pruner=None)
    spec = load_spec(path, baselines=True)
    # 2 trials + iso_flop_depth(full) (aliased by (add)) + iso_flop_width of each variant
    assert len(calls) == 1 and len(spec.grid.cells) == 5
    run_sweep(spec, tmp_path / "run", trial_fn=fake_trial)
    assert len(calls) == 1
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["groups"] == list(spec.grid.groups)
