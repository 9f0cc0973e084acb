"""End to end with the real train loop: a looped model and its iso-FLOP (depth) baseline, two workers."""

from __future__ import annotations

import csv
import math

from test_sweep_helpers import write_spec

from asura.sweep import manifest
from asura.sweep.compare import label
from asura.sweep.runner import run_sweep


def test_real_training_sweep_with_baseline(tmp_path):
    spec = write_spec(tmp_path, variants={"looped": {}}, baselines=["iso_flop_depth"], pruner=None)
    wd = run_sweep(spec, tmp_path / "run", workers=2)
    ms = {m["group"]: m for m in manifest.read_all(wd)}
    assert set(ms) == {"looped", "iso_flop_depth(looped)"}, [m.get("error") for m in ms.values()]
    loop, base = ms["looped"], ms["iso_flop_depth(looped)"]
    for m in (loop, base):
        assert m["status"] == "complete", m["error"]
        assert math.isfinite(m["value"]) and 0 < m["value"] < 10
        trial_dir = wd / "trials" / f"{m['trial']:04d}"
        assert (trial_dir / "metrics.jsonl").exists() and (trial_dir / "config.yaml").exists()
        assert m["tokens_seen"] == 12 * 8 * 32 and [e["step"] for e in m["evals"]] == [6, 12]
    assert set(loop["final"]) == {"1", "2"} and set(base["final"]) == {"1"}
    assert loop["metric"] == "ce" and loop["value"] == loop["final"]["2"]["ce"]  # read at the training depth
    assert base["config"]["model"]["n_layers"] == 2 and base["config"]["model"]["max_iterations"] == 1
    rows = {r["group"]: r for r in csv.DictReader((wd / "summary.csv").open())}
    assert rows["looped"]["label"] == "reference"
    assert rows["iso_flop_depth(looped)"]["label"] == label(base, loop)
    assert (wd / "plots" / "metric_vs_flops.png").exists()
    # One seed per group: the verdict says there is no interval or test, and REPORT.md carries it.
    verdict = rows["iso_flop_depth(looped)"]["verdict"]
    assert verdict.startswith("not tested: iso_flop_depth(looped) − looped = ") and "has n = 1" in verdict
    report = (wd / "REPORT.md").read_text()
    assert f"- `iso_flop_depth(looped)` vs `looped`: {verdict}" in report
    assert f"`python -m asura.sweep {spec} --workdir {wd} --workers 2`" in report  # trained by train.py: no trial_fn
