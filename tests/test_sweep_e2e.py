"""End to end as a user runs it: `python -m asura.sweep SPEC key=value --workers 2` trains a looped model and
its iso-FLOP (depth) baseline with the real train loop, printing one progress line per trial event."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys

from test_sweep_helpers import REPO, write_spec

from asura.sweep import manifest
from asura.sweep.compare import label


def test_real_training_sweep_with_baseline(tmp_path):
    spec = write_spec(tmp_path, variants={"looped": {}}, baselines=["iso_flop_depth"], pruner=None)
    wd = tmp_path / "run"
    # The spec evaluates every 6 steps; the override makes it every 4, in every trial.
    argv = [str(spec), "train.eval_every=4", "--workdir", str(wd), "--workers", "2"]
    p = subprocess.run([sys.executable, "-m", "asura.sweep", *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    ms = {m["group"]: m for m in manifest.read_all(wd)}
    assert set(ms) == {"looped", "iso_flop_depth(looped)"}, [m.get("error") for m in ms.values()]
    loop, base = ms["looped"], ms["iso_flop_depth(looped)"]
    for m in (loop, base):
        assert m["status"] == "complete", m["error"]
        assert math.isfinite(m["value"]) and 0 < m["value"] < 10
        trial_dir = wd / "trials" / f"{m['trial']:04d}"
        assert (trial_dir / "metrics.jsonl").exists() and (trial_dir / "config.yaml").exists()
        assert m["tokens_seen"] == 12 * 8 * 32 and [e["step"] for e in m["evals"]] == [4, 8, 12]
        assert m["extra_overrides"] == {"train.eval_every": 4}
    # Progress: each trial started and finished with its metric and wall time; no optuna log besides.
    for k, key in enumerate(("looped|seed=0", "iso_flop_depth(looped)|seed=0"), 1):
        assert f"trial {k}/2 started: {key}" in p.stdout, p.stdout
        shown = re.search(rf"trial {k}/2 finished: {re.escape(key)} ce=([\d.]+) in [\d.]+ s", p.stdout)
        assert shown and math.isclose(float(shown[1]), ms[key.split("|")[0]]["value"], rel_tol=1e-3), p.stdout
    assert "[I " not in p.stderr and "Trial " not in p.stderr, p.stderr
    assert set(loop["final"]) == {"1", "2"} and set(base["final"]) == {"1"}
    assert loop["metric"] == "ce" and loop["value"] == loop["final"]["2"]["ce"]  # read at the training depth
    assert base["config"]["model"]["n_layers"] == 2 and base["config"]["model"]["max_iterations"] == 1
    rows = {r["group"]: r for r in csv.DictReader((wd / "summary.csv").open())}
    assert rows["looped"]["label"] == "reference"
    assert rows["iso_flop_depth(looped)"]["label"] == label(base, loop)
    assert (wd / "plots" / "metric_vs_flops.png").exists()
    # One seed per group: the verdict says there are too few seeds for a test, and REPORT.md carries it.
    verdict = rows["iso_flop_depth(looped)"]["verdict"]
    assert verdict == "too few seeds: 1 complete seeds per arm (minimum 5); not tested"
    report = (wd / "REPORT.md").read_text()
    assert f"- `iso_flop_depth(looped)` vs `looped`: {verdict}" in report
    assert f"`python -m asura.sweep {' '.join(argv)}`" in report  # trained by train.py: no trial_fn
    assert "applied to every trial: `train.eval_every=4`" in report
