"""Study plans (python -m asura.sweep study) and depth extrapolation of a sweep's checkpoints."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml
from test_sweep_helpers import REPO, write_spec

from asura.sweep import extrapolation
from asura.sweep.__main__ import main
from asura.sweep.extrapolation import RESULTS, summarise
from asura.sweep.stats import describe
from asura.sweep.study import PrepareFailed, load_plan, run_plan


def write_plan(tmp_path, studies, **fields):
    plan = {"out": str(tmp_path / "out"), "workers": 1, "studies": studies, **fields}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"studies": []}, "lists no studies"),
        ({"wrokers": 2}, "unknown key 'wrokers'; did you mean 'workers'?"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"studies": [{"name": "a", "spec": "s.yaml"}, {"name": "a", "spec": "s.yaml"}]}, "duplicate name 'a'"),
        ({"studies": [{"name": "a"}]}, "studies[0] needs a name and a spec"),
        ({"studies": [{"name": "a", "spec": "s.yaml", "extrapolate": {"modes": ["wrap"]}}]}, "has 'wrap'; valid"),
        ({"studies": [{"name": "a", "spec": "s.yaml", "extrapolate": {"factr": 2}}]}, "unknown key 'factr'"),
        ({"studies": [{"name": "a", "spec": "s.yaml", "reports": ["loss"]}]}, "reports: metric='loss' is not valid"),
        # The last study's spec is broken: refused at the start, not after the first study's hours.
        ({"studies": [{"name": "ok", "spec": "s.yaml"}, {"name": "bad", "spec": "bad.yaml"}]}, "study bad: "),
        ({"studies": [{"name": "a", "spec": "nope.yaml"}]}, "studies.a.spec: sweep spec not found"),
        ({"prepare": {"dir": "pydocz"}}, "prepare: {dir: pydocz}: 'pydocz' is not a builtin corpus; valid: pydoc"),
        ({"prepare": ["pydoc"]}, "prepare must map an output dir to a builtin corpus"),
        ({"prepare": {"TMP/s.yaml": "pydoc"}}, "s.yaml is an existing file; the key names a directory"),
        ({"prepare": {"TMP/s.yaml/sub": "pydoc"}}, "s.yaml is a file, so"),
        ({"overrides": {"train.stpes": 5}}, "unknown config key 'train.stpes'"),
        ({"out": ""}, "out must be a directory path"),
    ],
)
def test_bad_plans_are_one_line_refusals_before_anything_runs(tmp_path, capsys, fields, needle):
    write_spec(tmp_path, "s")
    write_spec(tmp_path, "bad", overrides={"model.d_modle": 8})
    plan = write_plan(tmp_path, [{"name": "x", "spec": "s.yaml"}])
    if isinstance(fields.get("prepare"), dict):  # output dirs are relative to the repo root: TMP/ is this test's
        fields = {"prepare": {k.replace("TMP", str(tmp_path)): v for k, v in fields["prepare"].items()}}
    raw = {**yaml.safe_load(plan.read_text()), **fields}
    plan.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        main(["study", str(plan)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_only_names_a_study(tmp_path, capsys):
    write_spec(tmp_path, "s")
    plan = write_plan(tmp_path, [{"name": "x", "spec": "s.yaml"}])
    with pytest.raises(SystemExit):
        main(["study", str(plan), "--only", "y", "--dry-run"])
    assert "--only 'y' is not a study; valid: x" in capsys.readouterr().err


def test_shipped_plans_validate_every_spec(capsys):
    """Both presets load, and the GPU preset's overrides reach every trial of every sweep."""
    for name in ("cpu", "gpu"):
        main(["study", str(REPO / "configs" / "studies" / f"{name}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("demo_ablation: 30 trials") == 2 and out.count("text_iso_baselines: 15 trials") == 2
    protocol_plan = REPO / "configs" / "studies" / "cpu_protocol.yaml"
    main(["study", str(protocol_plan), "--dry-run", "--only", "demo_iso_baselines"])
    # 6 groups x 3 lrs x 2 tuning seeds run first: the count a user budgets by includes them
    assert "demo_iso_baselines: 48 trials + 36 lr-tuning trials" in capsys.readouterr().out
    from asura.sweep.study import check_plan

    for _study, spec in check_plan(load_plan(REPO / "configs" / "studies" / "gpu.yaml")):
        assert {c.config.model.d_model for c in spec.grid.cells if c.role == "trial"} == {256}


def test_summarise_is_the_seed_statistics():
    cfg = {"model": {"iterations": 2, "max_iterations": 2}, "depth": {"schedule": "fixed"}}
    recs = [
        {"group": "g", "mode": "last", "config": cfg, "rows": {"1": {"ce": 1.0}, "2": {"ce": 0.5}, "3": {"ce": 0.7}}},
        {"group": "g", "mode": "last", "config": cfg, "rows": {"1": {"ce": 2.0}, "2": {"ce": 0.25}, "3": {"ce": 0.9}}},
        {"group": "g", "mode": "none", "config": cfg, "rows": {"1": {"ce": 1.0}, "2": {"ce": 0.5}}},
    ]
    rows = {r["mode"]: r for r in summarise(recs, "ce", factor=2)}
    assert rows["last"]["depths"][3] == describe([0.7, 0.9]) and rows["last"]["depths"][1] == describe([1.0, 2.0])
    assert rows["none"]["depths"][3].n == 0 and rows["none"]["depths"][4].n == 0  # not runnable: no value, not 0


def test_study_trains_reports_extrapolates_and_resumes(tmp_path):
    """One real tiny sweep (2 seeds) through the study command: report, extrapolation, index, resume."""
    write_spec(tmp_path, "s", variants={"looped": {}}, seeds=[0, 1], pruner=None, metric="exact_match")
    studies = [{"name": "ex", "spec": "s.yaml", "reports": ["ce"], "extrapolate": {"factor": 2}}]
    plan = load_plan(write_plan(tmp_path, studies, workers=2))
    said: list[str] = []
    index = run_plan(plan, command="test", say=said.append)
    wd = plan.out / "ex"
    assert (wd / "REPORT.md").exists() and (wd / "REPORT_ce.md").exists() and (wd / "EXTRAPOLATION.md").exists()
    assert sum(s.startswith("extrapolate ") for s in said) == 2 * 3  # 2 trials x 3 modes

    results = sorted((wd / RESULTS).iterdir())  # committed with the records, one per cell
    assert [p.name for p in results] == ["looped__seed=0.json", "looped__seed=1.json"]
    for path in results:
        cache = json.loads(path.read_text())
        by_mode = {k.split(":")[0]: v["rows"] for k, v in cache.items()}
        assert sorted(map(int, by_mode["none"])) == [1, 2]  # none stops at max_iterations
        assert sorted(map(int, by_mode["last"])) == sorted(map(int, by_mode["cycle"])) == [1, 2, 3, 4]
        for n in ("1", "2"):  # in range, the mode changes nothing; fp32 sums may be ordered differently
            for mode in ("last", "cycle"):
                assert math.isclose(by_mode[mode][n]["ce"], by_mode["none"][n]["ce"], rel_tol=1e-5)
        # Past max_iterations the modes pick different slots: depth 3 runs slot 2 (last) or slot 1 (cycle).
        assert by_mode["last"]["3"]["ce"] != by_mode["cycle"]["3"]["ce"]
        # depth 4 under cycle = slots 1,2,1,2; its ce must be finite, whatever it is
        assert math.isfinite(by_mode["cycle"]["4"]["ce"])

    text = (wd / "EXTRAPOLATION.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| looped | none |"))
    assert row.rstrip(" |").endswith("| - | -")  # d3, d4 not runnable without extrapolation
    idx = index.read_text()
    assert (
        "| ex | " in idx
        and "| 2/2 |" in idx
        and "Trial time summed over every trial" in idx
        and "[EXTRAPOLATION.md](ex/EXTRAPOLATION.md)" in idx
    )

    said.clear()
    run_plan(plan, command="test again", say=said.append)  # everything done: nothing retrained or re-evaluated
    assert not [s for s in said if s.startswith("extrapolate ")]
    # Another clone: no checkpoints, only what is committed; the same command rewrites the same file.
    before = (wd / "EXTRAPOLATION.md").read_bytes()
    shutil.rmtree(wd / "trials")
    (wd / "EXTRAPOLATION.md").unlink()
    opts = extrapolation.Options(factor=2)
    extrapolation.run(wd, opts, extrapolation.command(wd, opts))
    assert (wd / "EXTRAPOLATION.md").read_bytes() == before
    ledger = json.loads((plan.out / "studies.json").read_text())
    assert [r["command"] for r in ledger["ex"]["runs"]] == ["test", "test again"]


def test_a_bad_prepare_step_is_refused_alike_by_dry_run_and_run(tmp_path):
    """The plan of the issue: `prepare: {dir: pydocz}` passed --dry-run, then the run died with a traceback."""
    write_spec(tmp_path, "s")
    plan = write_plan(tmp_path, [{"name": "x", "spec": "s.yaml"}], prepare={"dir": "pydocz"})
    runs = [subprocess.run([sys.executable, "-m", "asura.sweep", "study", str(plan), *dry], capture_output=True,
                           text=True, cwd=REPO, timeout=300) for dry in (["--dry-run"], [])]  # fmt: skip
    for p in runs:
        assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert "'pydocz' is not a builtin corpus; valid: pydoc" in p.stderr
    assert runs[0].stderr == runs[1].stderr
    assert not (tmp_path / "out").exists() and not (REPO / "dir").exists()


def test_a_prepare_that_fails_at_run_time_is_one_line(tmp_path):
    """A valid plan whose prepare cannot write when it runs (here the output appeared as a file after the
    plan was checked): PrepareFailed with the prepare command's own one-line reason; nothing trained."""
    write_spec(tmp_path, "s")
    target = tmp_path / "corpus"
    plan = load_plan(write_plan(tmp_path, [{"name": "x", "spec": "s.yaml"}], prepare={str(target): "pydoc"}))
    target.write_text("not a directory")
    with pytest.raises(PrepareFailed) as e:
        run_plan(plan, command="test", say=lambda _line: None)
    msg = str(e.value)
    assert "\n" not in msg and f"preparing {target} (builtin 'pydoc') failed with exit 2: " in msg, msg
    assert "is an existing file" in msg and "Traceback" not in msg
    assert not (plan.out / "x" / "trials").exists()


def test_extrapolation_skips_tuning_trials_and_cuts_intervals_to_the_range(tmp_path):
    """The lr-tuning trials are not the sweep's cells: no evaluation, no row (a tuning cell here has no
    checkpoint and no result, so evaluating it would fail). Exact-match intervals stay in [0, 1]."""
    from asura.sweep import manifest

    cfg = {"model": {"iterations": 1, "max_iterations": 1}, "depth": {"schedule": "fixed"}}
    for trial, (key, role) in enumerate([("a|seed=0", "trial"), ("a|lr=0.01|seed=100", "tune")]):
        rec = {"trial": trial, "key": key, "group": key.rsplit("|", 1)[0], "seed": 0, "role": role,
               "status": "complete", "config": cfg}  # fmt: skip
        manifest.write_record(tmp_path, rec)
    result = {"step": 10, "rows": {"1": {"exact_match": 0.5, "ce": 1.0}, "2": {"exact_match": 0.1, "ce": 2.0}}}
    path = extrapolation.result_path(tmp_path, "a|seed=0")
    path.parent.mkdir()
    source = {"trial": 0, "config_hash": None, "value": None}  # the record it was evaluated from
    path.write_text(json.dumps({"last:1,2:": {**result, "commit": "abc", "record": source}}))
    records = extrapolation.evaluate_sweep(tmp_path, factor=2, modes=("last",), say=lambda s: pytest.fail(s))
    assert [r["key"] for r in records] == ["a|seed=0"] and records[0]["commit"] == "abc"
    # The cell retrained since (a new record): its old result is not reused but evaluated again.
    manifest.write_record(tmp_path, {"trial": 7, "key": "a|seed=0", "group": "a", "seed": 0, "role": "trial",
                                     "status": "complete", "config": cfg})  # fmt: skip
    said = []
    with pytest.raises(Exception):  # noqa: B017  no checkpoint here: the attempt is what counts
        extrapolation.evaluate_sweep(tmp_path, factor=2, modes=("last",), say=said.append)
    assert said == ["extrapolate a|seed=0 mode=last depths 1..2"]
    assert extrapolation._cell(describe([0.0, 1.0]), "exact_match") == "0.500 [0.000, 1.000]"
    assert extrapolation._cell(describe([10.0, 11.0]), "ce") == "10.500 ± 6.353"  # inside [0, inf): as is
    assert extrapolation._cell(describe([1.0, 2.0]), "ce") == "1.500 [0.000, 7.853]"
