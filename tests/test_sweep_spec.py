"""Sweep spec validation: every bad spec is one line, before anything runs; CLI exits 2."""

from __future__ import annotations

import pytest
from test_sweep_helpers import write_spec

from asura.sweep.__main__ import main
from asura.sweep.spec import SpecError, grid_cells, load_spec


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
        ({"metric": "eval_los"}, "metric='eval_los'"),
        ({"pruner": {"percentile": 50, "warmup": 1}}, "pruner: unknown key 'warmup'"),
        ({"pruner": {"percentile": 150}}, "pruner.percentile must be in (0, 100)"),
        ({"search": {"method": "grid", "n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}}, "method"),
        ({"search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-2, "high": 1e-3}}}}, "must be < high"),
        ({"search": {"n_trials": 2, "params": {"model.injection": {"low": 0, "high": 1}}}}, "use choices"),
        ({"search": {"n_trials": 2, "params": {"model.injection": {"choices": ["add", "nope"]}}}}, "choice 'nope'"),
        ({"search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}, "seeds": [0, 1]}, "one seed"),
        ({"baselines": ["iso_parm"]}, "did you mean 'iso_param'?"),
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
    cells, impossible = grid_cells(spec)
    trials = [c for c in cells if c.role == "trial"]
    assert len(trials) == 4
    base = [c for c in cells if c.role != "trial"]
    # iso_flop_depth is the same 2-layer vanilla model for both variants: one run per seed, with an alias.
    assert {c.role for c in base} == {"iso_flop_depth"}
    assert len(base) == 2 and all(c.group == "iso_flop_depth(full)" for c in base)
    assert all(c.aliases == ("iso_flop_depth(add)",) for c in base)
    assert all(c.config.model.max_iterations == 1 and c.config.model.n_layers == 2 for c in base)
    # At d_model=32 no iso-param depth/d_ff and no iso-FLOP width fits: recorded, not skipped.
    groups = {i["group"] for i in impossible}
    assert groups == {f"{k}({v})" for k in ("iso_param", "iso_flop_width") for v in ("full", "add")}
    assert all(i["reason"].startswith(i["role"]) for i in impossible)
    assert len({c.key for c in cells}) == len(cells)
