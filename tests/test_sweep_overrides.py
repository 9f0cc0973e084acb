"""`python -m asura.sweep SPEC key=value ...`: overrides of every trial's base config, as train.py takes
them; recorded in sweep.json, each manifest and REPORT.md; a dir is resumed only with the same ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import test_sweep_helpers as helpers
import yaml
from test_sweep_helpers import REPO, fake_trial, write_spec

from asura.sweep import manifest
from asura.sweep.__main__ import main
from asura.sweep.runner import ResumeRefused, run_sweep
from asura.sweep.spec import SpecError, load_spec
from asura.sweep.study import check_plan, load_plan

VARIANTS = {"full": {}, "add": {"model.injection": "add"}}


@pytest.fixture(autouse=True)
def _reset():
    helpers.EXECUTIONS.clear()


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asura.sweep", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


def test_overrides_reach_every_trial_and_are_recorded(tmp_path):
    spec = load_spec(write_spec(tmp_path, variants=VARIANTS, pruner=None), cli_overrides=["train.steps=18"])
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial)
    ms = manifest.read_all(wd)
    assert len(ms) == 2 and {m["config"]["train"]["steps"] for m in ms} == {18}  # the spec says 12
    assert all(m["extra_overrides"] == {"train.steps": 18} for m in ms)
    assert [e["step"] for e in ms[0]["evals"]] == [6, 12, 18]
    assert json.loads((wd / "sweep.json").read_text())["extra_overrides"] == {"train.steps": 18}
    assert "applied to every trial: `train.steps=18`" in (wd / "REPORT.md").read_text()


def test_a_variant_still_wins_over_an_override(tmp_path):
    spec = load_spec(write_spec(tmp_path, variants=VARIANTS), cli_overrides=["model.injection=none"])
    assert {c.key: c.config.model.injection for c in spec.grid.cells} == {"full|seed=0": "none", "add|seed=0": "add"}


def test_resuming_with_other_overrides_is_refused_before_anything_runs(tmp_path):
    path = write_spec(tmp_path, variants=VARIANTS, pruner=None)
    wd = tmp_path / "run"
    run_sweep(load_spec(path, cli_overrides=["train.steps=18"]), wd, trial_fn=fake_trial, max_trials=1, report=False)
    before = (wd / "sweep.json").read_text()
    for other, shown in (([], "none"), (["train.steps=24"], "train.steps=24")):
        with pytest.raises(ResumeRefused, match=re.escape(f"was run with overrides train.steps=18, not {shown}")):
            run_sweep(load_spec(path, cli_overrides=other), wd, trial_fn=fake_trial, report=False)
    assert len(helpers.EXECUTIONS) == 1 and (wd / "sweep.json").read_text() == before
    run_sweep(load_spec(path, cli_overrides=["train.steps=18"]), wd, trial_fn=fake_trial, report=False)  # same: resumes
    assert len(helpers.EXECUTIONS) == 2


def test_a_study_refuses_a_dir_swept_under_other_overrides(tmp_path):
    write_spec(tmp_path, "s", variants=VARIANTS, pruner=None)
    plan_path = tmp_path / "plan.yaml"
    raw = {"out": str(tmp_path / "out"), "overrides": {"train.steps": 18}, "studies": [{"name": "x", "spec": "s.yaml"}]}
    plan_path.write_text(yaml.safe_dump(raw))
    run_sweep(tmp_path / "s.yaml", tmp_path / "out" / "x", trial_fn=fake_trial, max_trials=1, report=False)
    with pytest.raises(SpecError, match=r"study x: sweep dir .* was run with overrides none, not train\.steps=18"):
        check_plan(load_plan(plan_path))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.stpes=5", "unknown config key 'train.stpes'; did you mean 'steps'?"),
        ("train.steps=abc", "train.steps must be an integer, got 'abc'"),
        ("train.steps", "override 'train.steps' must look like section.key=value"),
        ("train.seed=3", "set train.seed through the top-level seeds: [...] axis"),
        ("model.injection=add", "override model.injection: the spec sweeps it (axes.model.injection)"),
    ],
)
def test_bad_overrides_are_one_line(tmp_path, capsys, override, needle):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add"]})
    with pytest.raises(SystemExit) as e:
        main([str(spec), override, "--workdir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.err.count("\n") == 1 and needle in captured.err, captured.err
    assert not (tmp_path / "run").exists()


def test_cli_overrides_as_users_type_them(tmp_path):
    """A real `python -m asura.sweep`: overrides before and after flags, recorded; a resume under others
    is one stderr line, exit 2, before anything is written."""
    spec = write_spec(tmp_path, variants=VARIANTS, pruner=None)
    wd = tmp_path / "run"
    dry = _sweep(str(spec), "train.steps=18", "--dry-run", "model.adapter=abba")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "overrides (every trial): train.steps=18 model.adapter=abba"
    first = _sweep(str(spec), "--workdir", str(wd), "train.steps=18", "--max-trials", "0")  # prepares, trains nothing
    assert first.returncode == 0, first.stderr
    meta = json.loads((wd / "sweep.json").read_text())
    assert meta["extra_overrides"] == {"train.steps": 18} and "train.steps=18" in meta["commands"][0]["command"]
    other = _sweep(str(spec), "train.steps=24", "--workdir", str(wd), "--max-trials", "0")
    assert other.returncode == 2 and other.stdout == "" and other.stderr.count("\n") == 1, other.stderr
    assert "was run with overrides train.steps=18, not train.steps=24" in other.stderr
    assert json.loads((wd / "sweep.json").read_text()) == meta


def test_overrides_are_recorded_as_the_config_reads_them(tmp_path):
    """`train.lr=3e-3` (a string to YAML) and `train.lr=0.003` are one override: a resume compares values."""
    path = write_spec(tmp_path, variants=VARIANTS, pruner=None)
    wd = tmp_path / "run"
    run_sweep(load_spec(path, cli_overrides=["train.lr=3e-3"]), wd, trial_fn=fake_trial, max_trials=1, report=False)
    assert json.loads((wd / "sweep.json").read_text())["extra_overrides"] == {"train.lr": 0.003}
    run_sweep(load_spec(path, cli_overrides=["train.lr=0.003"]), wd, trial_fn=fake_trial, report=False)
    assert len(helpers.EXECUTIONS) == 2
