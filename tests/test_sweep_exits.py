"""python -m asura.sweep exits: quality against executed FLOPs across a sweep, and its pre-registered comparison.

The end-to-end test trains a real tiny sweep (a gate model with and without halting training, and
its vanilla baseline) through the study command and checks each committed number against an
independent path: asura.analysis.depth.evaluate_exits / evaluate_depths on the restored checkpoint
and asura.flops.executed_flops. The verdict logic is checked on records with known numbers.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from test_sweep_helpers import write_spec

from asura.sweep import exits
from asura.sweep.__main__ import main
from asura.sweep.stats import describe
from asura.sweep.study import load_plan, run_plan


def write_plan(tmp_path, studies):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "workers": 2, "studies": studies}))
    return path


GATE = {"model.guidance": "none", "model.exit_gate": True, "model.exit_entropy": 0.05}


def test_study_evaluates_exits_against_an_independent_path_and_regenerates_from_records(tmp_path):
    spec = yaml.safe_load(write_spec(tmp_path, "s").read_text())
    spec["overrides"].update(GATE)
    spec.update(
        seeds=[0, 1], pruner=None, metric="exact_match", reference="plain", baselines=["iso_param"],
        variants={"plain": {}, "halt": {"depth.halt_rule": "gate", "depth.halt_threshold": 0.5, "depth.halt_from": 6}},
    )  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    opts = {"exits": ["gate:0.5,0.9", "never"], "kv": "copy", "primary": "halt@gate:0.5", "max_flops": 0.95}
    plan = load_plan(write_plan(tmp_path, [{"name": "h", "spec": "s.yaml", "exits": opts}]))
    said: list[str] = []
    run_plan(plan, command="test", say=said.append)
    wd = plan.out / "h"
    assert sum(s.startswith("exits ") for s in said) == 6  # 3 groups x 2 seeds, tuning trials none here

    from asura.analysis.depth import evaluate_depths, evaluate_exits
    from asura.data import build_eval_batches
    from asura.flops import executed_flops
    from asura.io.load import load
    from asura.model.halting import HaltSpec
    from asura.sweep import manifest

    records = {r["key"]: r for r in manifest.read_all(wd)}
    (baseline,) = [k for k, r in records.items() if r["role"] == "iso_param" and r["seed"] == 0]
    for key in ("halt|seed=1", baseline):
        (result,) = json.loads(exits.result_path(wd, key).read_text()).values()
        loaded = load(wd / "trials" / f"{int(records[key]['trial']):04d}", "latest")
        data = build_eval_batches(loaded.cfg, loaded.cfg.train.eval_batches)
        n = loaded.cfg.model.iterations
        fixed = evaluate_depths(loaded.model, data, range(1, n + 1))
        assert [f["exact_match"] for f in result["fixed"]] == [f["exact_match"] for f in fixed]
        assert [f["flops_per_token"] for f in result["fixed"]] == [executed_flops(loaded.cfg, {d: 1.0})
                                                                   for d in range(1, n + 1)]  # fmt: skip
        if not loaded.cfg.model.exit_gate:  # the vanilla baseline: the gate rule is left out, never runs
            assert [e["rule"] for e in result["exits"]] == ["never"]
            continue
        ref = evaluate_exits(loaded.model, loaded.cfg, data, n, [HaltSpec("gate", 0.9), HaltSpec("never")])
        got = {(e["rule"], e["threshold"]): e for e in result["exits"]}
        for r in ref:
            e = got[(r["rule"], r["threshold"])]
            assert e["exact_match"] == r["exact_match"] and e["mean_depth"] == r["mean_depth"]
            assert e["flops_per_token"] == executed_flops(loaded.cfg, r["depth_pmf"], rule_gate=r["rule"] == "gate")
        # `never` is the full depth: the same answers as fixed depth n
        assert got[("never", None)]["exact_match"] == fixed[-1]["exact_match"]

    text = (wd / "EXITS.md").read_text()
    assert "## Pre-registered comparison" in text and "`halt@gate:0.5` against `plain depth 2`" in text
    assert f"| {records[baseline]['group']} | depth 1 | 2 |" in text and "| halt | gate:0.9 | 2 |" in text
    assert (wd / "plots" / "exits.png").stat().st_size > 0

    said.clear()
    run_plan(plan, command="again", say=said.append)  # nothing retrained or re-evaluated
    assert not [s for s in said if s.startswith("exits ")]
    before = text.encode()
    shutil.rmtree(wd / "trials")  # another clone: the committed records and results alone
    (wd / "EXITS.md").unlink()
    o = exits.Options(tuple(opts["exits"]), "copy", None, opts["primary"], opts["max_flops"])
    exits.run(wd, o, exits.command(wd, o))
    assert (wd / "EXITS.md").read_bytes() == before


def _record(group, seed, em_fixed, exit_rows):
    fixed = [{"depth": d + 1, "exact_match": em, "flops_per_token": 100.0 * (d + 1)} for d, em in enumerate(em_fixed)]
    return {"group": group, "seed": seed, "depth": len(em_fixed), "fixed": fixed, "exits": exit_rows}


def _gate(tau, em, depth):
    return {"rule": "gate", "threshold": tau, "exact_match": em, "mean_depth": depth, "flops_per_token": 100.0 * depth}


def test_the_primary_verdict_needs_both_quality_and_compute():
    ref_em = [0.90, 0.94, 0.98]  # plain at depth 3: mean 0.94, 95% CI 0.94 ± 4.303·0.04/√3 = [0.841, 1.039]
    recs = [_record("plain", s, [0.1, 0.8, em], []) for s, em in enumerate(ref_em)]
    recs += [_record("halt", s, [0.1, 0.7, 0.9], [_gate(0.3, em, 2.0)]) for s, em in enumerate([0.85, 0.86, 0.87])]
    rows, ref = exits.summarise(recs, "plain")
    assert ref["name"] == "plain depth 3" and ref["flops"] == 300.0
    band = describe(ref_em)
    assert band.low < 0.86 < band.high  # the halt mean sits inside the band
    opts = exits.Options(("gate:0.3",), primary="halt@gate:0.3", max_flops=0.7)
    text = "\n".join(exits.primary(rows, ref, opts))
    assert "**inside**" in text and "66.7% of the reference's" in text and "**Bar met**" in text
    # the same quality at 2.2 iterations (73%) misses the compute bar
    slow = [r if r["group"] == "plain" else {**r, "exits": [_gate(0.3, r["exits"][0]["exact_match"], 2.2)]}
            for r in recs]  # fmt: skip
    text = "\n".join(exits.primary(*exits.summarise(slow, "plain"), opts))
    assert "**not met**" in text and "**Bar not met**" in text
    # and cheap but worse than the band misses the quality bar
    worse = [r if r["group"] == "plain" else {**r, "exits": [_gate(0.3, 0.5, 2.0)]} for r in recs]
    text = "\n".join(exits.primary(*exits.summarise(worse, "plain"), opts))
    assert "**outside**" in text and "**Bar not met**" in text
    # without a registered protocol the verdict is labelled exploratory; under one, only its seeds count
    from asura.sweep.protocol import Protocol

    assert "**Exploratory**" in "\n".join(exits.primary(rows, ref, opts))
    text = "\n".join(exits.primary(rows, ref, opts, Protocol(seeds=(0, 1, 2), min_seeds=3)))
    assert "**Exploratory**" not in text and "seeds [0, 1, 2]" in text and "**Bar met**" in text
    text = "\n".join(exits.primary(rows, ref, opts, Protocol(seeds=(0, 1, 7), min_seeds=3)))
    assert "2 of the protocol's seeds are complete in both arms, fewer than its min_seeds=3" in text
    assert "Bar" not in text
    # the table's Δ is paired per seed: halt − plain = −0.05, −0.08, −0.11
    row = next(line for line in exits.table(rows, ref) if line.startswith("| halt | gate:0.3 |"))
    d = describe([-0.05, -0.08, -0.11])
    assert f"{d.mean:+.3f} ± {d.half_width:.3f}" in row and "| 2.00 | 66.7% |" in row
    assert math.isclose(d.mean, -0.08)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--exit", "gait:0.3"], "exit 'gait:0.3': exit rule='gait' is not valid"),
        (["--exit", "gate:0.3", "--kv", "swap"], "kv='swap' is not valid; choose one of copy, full"),
        ([], "no exit rule named"),
        (["--exit", "gate:0.3", "--primary", "halt@gate:0.4"], "primary='halt@gate:0.4' must be GROUP@RULE:T"),
        (["--exit", "gate:0.3", "--max-flops", "1.5"], "max_flops must be a fraction in (0, 1]"),
    ],
)
def test_bad_exits_options_are_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["exits", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize(
    ("exits_opts", "needle"),
    [
        ({"exits": ["gate:x"]}, "studies.a.exits: exit 'gate:x': thresholds must be numbers"),
        ({"exits": "gate:0.3"}, "studies.a.exits.exits must be a list of RULE[:T,..] strings"),
        ({"exits": ["gate:0.3"], "primary": "hlat@gate:0.3"}, "studies.a.exits.primary: group 'hlat' is not in"),
        ({"exits": ["gate:0.3"], "kv": "swap"}, "studies.a.exits: kv='swap' is not valid"),
    ],
)
def test_a_plan_with_bad_exits_is_refused_before_anything_runs(tmp_path, capsys, exits_opts, needle):
    write_spec(tmp_path, "s", variants={"halt": {}}, reference="halt")
    plan = write_plan(tmp_path, [{"name": "a", "spec": "s.yaml", "exits": exits_opts}])
    with pytest.raises(SystemExit):
        main(["study", str(plan)])
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
