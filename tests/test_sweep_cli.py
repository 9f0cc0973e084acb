"""`python -m asura.sweep`: every refusal is one line on stderr, exit 2, and writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_sweep_helpers import REPO, fake_trial, write_spec

from asura.sweep.__main__ import main
from asura.sweep.runner import run_sweep


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.count("\n") == 0 and "usage:" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "python -m asura.sweep: error: the following arguments are required: spec"),
        (["spec.yaml", "--bogus"], "unrecognized arguments: --bogus"),
        (["spec.yaml", "--workers", "two"], "argument --workers: invalid int value: 'two'"),
        (["spec.yaml", "--workers", "0"], "--workers must be >= 1"),
        (["spec.yaml", "--max-trials", "-1"], "--max-trials must be >= 0"),
        (["report"], "python -m asura.sweep report: error: the following arguments are required: workdir"),
        (["report", "a", "b"], "unrecognized arguments: b"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, needle):
    assert needle in _refused(capsys, argv)


def test_report_of_a_missing_dir_exits_2_and_creates_nothing(tmp_path, capsys):
    d = tmp_path / "nope"
    assert f"sweep dir {d} does not exist" in _refused(capsys, ["report", str(d)])
    assert not d.exists()


def test_report_of_a_dir_without_trials_exits_2_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no trials/<id>/manifest.json; nothing to report" in _refused(capsys, ["report", str(empty)])
    assert list(empty.iterdir()) == []
    # A sweep prepared but with no trial run yet (sweep.json, an empty trials/) is refused the same way.
    (empty / "trials").mkdir()
    (empty / "sweep.json").write_text(json.dumps({"metric": "ce"}))
    _refused(capsys, ["report", str(empty)])
    assert sorted(p.name for p in empty.iterdir()) == ["sweep.json", "trials"]


def test_report_of_a_sweep_writes_tables(tmp_path, capsys):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add"]}, pruner=None)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    main(["report", str(wd)])
    out = capsys.readouterr().out.split()
    assert str(wd / "summary.md") in out and (wd / "summary.csv").exists()
    assert "| ce mean ± 95% CI |" in (wd / "summary.md").read_text()
    assert str(wd / "REPORT.md") in out


def test_dry_run_lists_the_grid(tmp_path, capsys):
    spec = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}})
    main([str(spec), "--dry-run", "--baselines", "--workdir", str(tmp_path / "run")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "full|seed=0  [trial]",
        "add|seed=0  [trial]",
        "iso_flop_depth(full)|seed=0  [iso_flop_depth]  aliases=['iso_flop_depth(add)']",
    ]
    assert [line.split()[0] for line in lines if "[impossible]" in line] == ["iso_param(full)", "iso_param(add)"]
    assert not (tmp_path / "run").exists()


def test_dry_run_lists_the_lr_tuning_phase_first(tmp_path, capsys):
    spec = write_spec(tmp_path, variants={"full": {}}, seeds=[0, 1])
    spec.write_text(spec.read_text() + "tune: {lr: [0.001, 0.01], seeds: [100]}\n")
    main([str(spec), "--dry-run", "--workdir", str(tmp_path / "run")])
    assert capsys.readouterr().out.splitlines() == [
        "full|lr=0.001|seed=100  [tune]",
        "full|lr=0.01|seed=100  [tune]",
        "full|seed=0  [trial]",
        "full|seed=1  [trial]",
    ]


def test_module_entry_point_is_one_line(tmp_path):
    """The real `python -m` path: exit 2, one stderr line, no usage block."""
    p = subprocess.run(
        [sys.executable, "-m", "asura.sweep", "report", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "nope").exists()


def test_help_lists_every_subcommand_with_one_line_each():
    """`python -m asura.sweep --help`: each subcommand on one line with what it does; each has its own --help."""
    p = subprocess.run([sys.executable, "-m", "asura.sweep", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    for name in ("report", "extrapolate", "study"):
        lines = [line for line in p.stdout.splitlines() if re.search(rf"asura\.sweep {name} \S+\s+\w", line)]
        assert len(lines) == 1, (name, p.stdout)
        sub = subprocess.run([sys.executable, "-m", "asura.sweep", name, "--help"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)  # fmt: skip
        assert sub.returncode == 0 and f"asura.sweep {name}" in sub.stdout, sub.stderr
    assert "key=value" in p.stdout  # the overrides of every trial's base config
