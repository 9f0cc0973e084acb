"""The sweep report: CIs and verdicts in the tables, honest plots, REPORT.md, and one metric for every row."""

from __future__ import annotations

import csv
import json
import subprocess

import matplotlib
import pytest
from matplotlib.container import ErrorbarContainer
from test_sweep_helpers import REPO, TINY, fake_metrics, write_spec

from asura.config.load import load_config
from asura.depth import eval_depths
from asura.sweep import manifest
from asura.sweep.__main__ import main
from asura.sweep.metrics import METRICS, MetricSpec
from asura.sweep.report import ReportRefused, draw_ablation, draw_metric_vs, group_rows, write_report
from asura.sweep.runner import run_sweep
from asura.sweep.stats import compare_seeds, describe, signed_rank_p

matplotlib.use("Agg")
CE = MetricSpec("ce", None, METRICS["ce"])
# Per-seed noise shared by every config of a seed (same data order, same init stream) plus a small
# per-run term: what pairing by seed is for.
SHARED = {0: 0.00, 1: 0.08, 2: -0.05, 3: 0.03, 4: -0.02}
OWN = {("projconcat", 0): 0.010, ("projconcat", 1): -0.004, ("projconcat", 2): 0.002, ("projconcat", 3): -0.008,
       ("projconcat", 4): 0.005, ("add", 0): -0.006, ("add", 1): 0.012, ("add", 2): 0.001, ("add", 3): 0.009,
       ("add", 4): -0.003}  # fmt: skip
SEEDS = [0, 1, 2, 3, 4]  # the minimum for a verdict (asura.sweep.protocol.MIN_SEEDS)


def noisy_trial(cfg, workdir, on_eval) -> dict:
    """Like fake_trial, with seed noise: add is worse than projconcat by ~0.3 ce."""
    workdir.mkdir(parents=True, exist_ok=True)
    inj, seed = cfg.model.injection, cfg.train.seed
    final = None
    for step in range(cfg.train.eval_every, cfg.train.steps + 1, cfg.train.eval_every):
        final = {}
        for d in eval_depths(cfg):
            m = fake_metrics(cfg, step, d)
            m["ce"] = 3.0 + {"projconcat": 0.0, "add": 0.3}[inj] + SHARED[seed] + OWN[(inj, seed)] + 0.01 * d
            final[d] = m
        on_eval(step, final)
    return {"final": final, "step": cfg.train.steps}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    spec = write_spec(tmp, variants={"full": {}, "add": {"model.injection": "add"}}, seeds=SEEDS, pruner=None)
    return run_sweep(spec, tmp / "run", trial_fn=noisy_trial)


def _rows(wd):
    return {r["group"]: r for r in csv.DictReader((wd / "summary.csv").open())}


def test_summary_has_ci_and_verdict_against_the_reference(sweep):
    rows = _rows(sweep)
    full = [m["value"] for m in manifest.read_all(sweep) if m["group"] == "full"]
    s = describe(full)
    assert float(rows["full"]["ci95"]) == pytest.approx(s.half_width)
    assert (float(rows["full"]["ci_low"]), float(rows["full"]["ci_high"])) == (
        pytest.approx(s.low),
        pytest.approx(s.high),
    )
    assert rows["full"]["verdict"] == "reference" and rows["add"]["label"] == "neither"
    by = {g: {m["seed"]: m["value"] for m in manifest.read_all(sweep) if m["group"] == g} for g in ("add", "full")}
    want = compare_seeds(by["add"], by["full"], direction="minimize", names=("add", "full"), metric="ce",
                         kind="neither")  # fmt: skip
    w = signed_rank_p(by["add"], by["full"])
    assert w == pytest.approx(2 / 2**5)  # every seed favours full: the smallest two-sided p at n = 5
    # No protocol: exploratory; one comparison, so Holm leaves p as it is.
    verdict = (f"exploratory: full beats add by {abs(want.diff):.3f} ± {want.half_width:.3f} ce (neither, paired "
               f"t-test Holm p = {want.p:.2g}, Wilcoxon Holm p = {w:.2g}, n = 5 seeds)")  # fmt: skip
    assert rows["add"]["verdict"] == verdict and rows["add"]["test"] == "paired t-test"
    assert float(rows["add"]["p"]) == pytest.approx(want.p) == pytest.approx(float(rows["add"]["p_holm"]))
    assert float(rows["add"]["delta_ci95"]) > 0
    md = (sweep / "summary.md").read_text()
    assert "| ce mean ± 95% CI |" in md and "| verdict vs ref |" in md and verdict in md
    assert "| label vs ref |" in md and "| neither |" in md


def test_report_md_has_tables_plots_commands_commit_and_wall_time(sweep):
    text = (sweep / "REPORT.md").read_text()
    rows = _rows(sweep)
    assert "## Results" in text and "| ce mean ± 95% CI |" in text
    assert f"- `add` vs `full`: {rows['add']['verdict']}" in text
    for png in ("metric_vs_flops.png", "metric_vs_params.png", "ablation.png"):
        assert f"(plots/{png})" in text and (sweep / "plots" / png).stat().st_size > 1000
    spec_path = sweep.parent / "spec.yaml"
    assert f"`python -m asura.sweep {spec_path} --workdir {sweep}  # in-process, trial_fn=noisy_trial" in text
    assert f"Report command: `python -m asura.sweep report {sweep}`" in text
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    sha = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert f"Trials ran at git commit(s): `{sha}" in text
    total = sum(m["wall_s"] for m in manifest.read_all(sweep))
    assert f"Total trial wall time: {total:.1f} s (" in text and "summed over all 10 trials (10 complete)" in text
    assert "## Protocol" in text and "every verdict below is **exploratory**" in text
    assert "Environment (trials):" in text and "- 10 trial(s): cpu (" in text


def test_report_cli_records_its_command_and_commands_accumulate(tmp_path, capsys):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add"]}, seeds=[0, 1], pruner=None)
    wd = tmp_path / "run"
    run_sweep(spec, wd, trial_fn=noisy_trial, max_trials=2, report=False)
    run_sweep(spec, wd, trial_fn=noisy_trial, command="python -m asura.sweep spec.yaml --workdir run")
    commands = json.loads((wd / "sweep.json").read_text())["commands"]
    assert [c["command"].split("  #")[0] for c in commands] == [
        f"python -m asura.sweep {spec} --workdir {wd} --max-trials 2",
        "python -m asura.sweep spec.yaml --workdir run",
    ]
    before = (wd / "REPORT.md").read_text()
    main(["report", str(wd), "--metric", "ce@1"])
    out = capsys.readouterr().out.split()
    assert str(wd / "REPORT_ce_at1.md") in out and str(wd / "REPORT.md") not in out
    assert (wd / "REPORT.md").read_text() == before  # the sweep's own report is kept, not overwritten
    assert (wd / "plots_ce_at1" / "learning_curves.png").stat().st_size > 1000
    text = (wd / "REPORT_ce_at1.md").read_text()
    assert "(plots_ce_at1/ablation.png)" in text
    assert f"Report command: `python -m asura.sweep report {wd} --metric ce@1`" in text
    assert "The sweep optimised `ce`; this report tabulates `ce@1`." in text
    assert all(f"- `{c['command']}`" in text for c in commands)


def test_git_commit_outside_a_repo_is_unknown(tmp_path):
    assert manifest.git_commit(tmp_path) == "unknown"


def test_git_commit_marks_code_changes_but_not_rewritten_reports(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "REPORT.md").write_text("old\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    sha = manifest.git_commit(tmp_path)
    assert len(sha) == 40
    (tmp_path / "results" / "REPORT.md").write_text("rewritten by a study\n")
    (tmp_path / "untracked.txt").write_text("x")
    assert manifest.git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("a = 2\n")
    assert manifest.git_commit(tmp_path) == f"{sha} (uncommitted changes)"


def _guided_manifests(tmp_path):
    """Two real runs that differ only in model.guidance, with final evals as the train loop writes them."""
    over = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in TINY.items()]
    runs = []
    for trial, (guidance, seed) in enumerate([(g, s) for g in ("none", "linear") for s in SEEDS]):
        cfg = load_config(REPO / "configs" / "demo.yaml", [*over, f"model.guidance={guidance}", f"train.seed={seed}"])
        ce = {1: 3.1 + 0.01 * seed, 2: 2.5 + 0.02 * seed}  # depth 2 = model.iterations: the final iteration
        # Guidance weights CE over iterations into the objective: a different number for the same model.
        obj = {d: (0.5 * ce[1] + 0.5 * ce[2] if guidance == "linear" else ce[d]) + cfg.model.z_loss for d in ce}
        final = {d: {"ce": ce[d], "objective": obj[d], "accuracy": 0.5, "exact_match": 0.25} for d in ce}
        cell = {"key": f"{guidance}|seed={seed}", "group": guidance, "seed": seed, "role": "trial", "parent": None,
                "overrides": {"model.guidance": guidance}, "aliases": ()}  # fmt: skip
        m = manifest.build(trial=trial, cell=cell, cfg=cfg, status="complete", metric="ce", value=ce[2],
                           evals=[(12, final)], final=final, steps_done=12, wall_s=1.5)  # fmt: skip
        manifest.write(tmp_path / "trials" / f"{trial:04d}", m)
        runs.append(m)
    assert runs[0]["config"]["model"]["guidance"] != runs[5]["config"]["model"]["guidance"]
    assert {k: v for k, v in runs[0]["config"]["model"].items() if k != "guidance"} == {
        k: v for k, v in runs[5]["config"]["model"].items() if k != "guidance"
    }
    return runs


def test_default_comparison_reads_final_iteration_ce_for_guided_and_unguided_runs(tmp_path):
    """The metric bug must not return: a guided run's objective is never compared with an unguided run's CE."""
    runs = _guided_manifests(tmp_path)
    out = write_report(tmp_path, commit="abc")  # no sweep.json: the default metric
    rows = {r["group"]: r for r in out["rows"]}
    for m in runs:
        assert rows[m["group"]]["by_seed"][m["seed"]] == m["final"]["2"]["ce"]  # both: ce at the final iteration
    assert rows["linear"]["delta"] == pytest.approx(0.0) and rows["none"]["label"] == "reference"
    assert "no difference: linear and none are identical in every seed" in rows["linear"]["verdict"]
    assert "# Sweep : ce (minimize)" in (tmp_path / "summary.md").read_text()
    (tmp_path / "sweep.json").write_text(json.dumps({"metric": "ce", "groups": ["none", "linear"]}))
    assert [r["value"] for r in group_rows(runs, {"metric": "ce"})] == [pytest.approx(2.54), pytest.approx(2.54)]


def test_objective_across_guidance_is_refused_in_one_line(tmp_path, capsys):
    _guided_manifests(tmp_path)
    with pytest.raises(ReportRefused) as e:
        write_report(tmp_path, "objective")
    msg = str(e.value)
    assert msg.startswith("metric=objective (the training objective") and "\n" not in msg
    assert "none|seed=0 has model.guidance='none' but linear|seed=0 has 'linear': use metric: ce" in msg
    assert not (tmp_path / "summary.md").exists() and not (tmp_path / "REPORT.md").exists()  # refused before writing
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--metric", "objective"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "metric=objective" in err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--metric", "loss"])
    assert "choose one of ce, exact_match, accuracy, objective" in capsys.readouterr().err


def test_missing_seed_falls_back_to_welch_in_the_report(tmp_path):
    runs = _guided_manifests(tmp_path)
    runs[6] = {**runs[6], "status": "failed", "value": None}  # linear seed 1 failed
    runs.append({**runs[6], "trial": 10, "status": "complete", "seed": 5, "key": "linear|seed=5"})
    rows = {r["group"]: r for r in group_rows(runs, {})}  # seeds 0-4 vs 0, 2-5
    assert rows["linear"]["test"] == "Welch t-test (unpaired)" and "n = 5 vs 5 seeds" in rows["linear"]["verdict"]
    runs[7] = {**runs[7], "status": "failed", "value": None}  # and seed 2: 4 complete seeds, under the minimum
    rows = {r["group"]: r for r in group_rows(runs, {})}
    assert rows["linear"]["verdict"] == "too few seeds: 4 complete seeds per arm (minimum 5); not tested"
    assert rows["linear"]["p"] is None and rows["linear"]["test"] == "no test"


def _row(group, role, value, ci, values, flops):
    return {"group": group, "role": role, "value": value, "ci95": ci, "values": values, "label": "x",
            "train_flops": flops, "params_unique": flops / 10}  # fmt: skip


ROWS = [
    {**_row("looped", "trial", 2.0, 0.3, [1.8, 2.0, 2.2], 3e9), "label": "reference"},
    _row("iso_flop_width(looped)", "iso_flop_width", 2.4, 0.1, [2.35, 2.4, 2.45], 3e9),
    _row("one_seed", "trial", 2.6, None, [2.6], 1e9),
]


def _bars(ax) -> list[float]:
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    return [abs(seg[1][1] - seg[0][1]) for seg in container.lines[2][0].get_segments()]


def test_ablation_is_a_dot_plot_with_ci_error_bars():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_ablation(ax, ROWS, CE)
    assert _bars(ax) == pytest.approx([0.6, 0.2, 0.0])  # 2 × the 95% CI half-width; none for n = 1
    # No bars (a bar's length reads as the value): if bars come back, they must start at 0.
    assert not [p for p in ax.patches if p.get_height()] or ax.get_ylim()[0] <= 0
    assert ax.get_xlabel() == "group" and ax.get_ylabel().startswith("ce: cross-entropy (nats/token)")
    assert "minimize" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["group"] for r in ROWS]
    plt.close(fig)


def test_metric_vs_flops_error_bars_are_the_ci_and_axes_are_labelled():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_metric_vs(ax, ROWS, "train_flops", "training FLOPs (per token × tokens)", CE)
    bars = sorted(b for c in ax.containers if isinstance(c, ErrorbarContainer) for b in _bars_of(c))
    assert bars == pytest.approx([0.0, 0.2, 0.6])
    assert ax.get_xlabel() == "training FLOPs (per token × tokens)"
    assert ax.get_ylabel().startswith("ce: cross-entropy (nats/token), minimize")
    plt.close(fig)


def _bars_of(container) -> list[float]:
    return [abs(seg[1][1] - seg[0][1]) for seg in container.lines[2][0].get_segments()]


def test_the_report_command_names_a_repository_dir_relative_to_its_root():
    """So a report regenerated from committed records in another clone reads the same."""
    from asura.sweep.report import report_command

    assert report_command(REPO / "results" / "x", "ce") == "python -m asura.sweep report results/x --metric ce"
    assert report_command("/elsewhere/x") == "python -m asura.sweep report /elsewhere/x"


def crossing_trial(cfg, workdir, on_eval) -> dict:
    """`add` starts 0.1 ce behind `full` and gains 0.1 per eval (2 steps apart): level at step 4,
    ahead from step 6 on."""
    workdir.mkdir(parents=True, exist_ok=True)
    final = None
    for step in range(2, 13, 2):
        final = {}
        for d in eval_depths(cfg):
            m = fake_metrics(cfg, step, d)
            gain = 0.2 - 0.05 * step if cfg.model.injection == "add" else 0.0
            m["ce"] = 3.0 - 0.01 * step + gain + 0.001 * cfg.train.seed + 0.01 * d
            final[d] = m
        on_eval(step, final)
    return {"final": final, "step": cfg.train.steps}


def test_learning_curves_table_and_crossing_point_from_recorded_evals(tmp_path):
    from asura.sweep.metrics import parse_metric
    from asura.sweep.report import crossing, learning_curves

    spec = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}}, seeds=[0, 1], pruner=None)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=crossing_trial)
    ms = manifest.read_all(wd)
    rows = group_rows(ms, json.loads((wd / "sweep.json").read_text()))
    curves = learning_curves(rows, ms, parse_metric("ce"))
    full, add = curves["full"], curves["add"]
    assert full.steps == add.steps == [2, 4, 6, 8, 10, 12] and full.n == [2] * 6
    # tokens per step: batch 8 x seq_len 32, from each trial's planned tokens
    assert full.tokens_per_step == 8 * 32
    trained = 2  # TINY iterations: the metric is read at the trained depth
    want = [3.0 - 0.01 * s + (0.2 - 0.05 * s) + 0.0005 + 0.01 * trained for s in full.steps]
    assert add.mean == pytest.approx(want)
    # level at step 4 is not ahead (strictly better is required); ahead from step 6 for good
    assert crossing(add, full, "minimize") == 6
    assert crossing(full, add, "minimize") is None
    assert crossing(add, full, "maximize") is None  # with the direction flipped, add is ahead only up to step 2
    text = (wd / "REPORT.md").read_text()
    assert "## Learning curves" in text and f"| 6 | 1.54K | {full.mean[2]:.4f} | {add.mean[2]:.4f} |" in text
    assert "- `add` better than `full`: from step 6 (1.54K tokens)" in text


def logging_trial(cfg, workdir, on_eval) -> dict:
    """crossing_trial that also logs a training ce every step to metrics.jsonl, as train.py does:
    train ce = 2.0 + 0.01 * step (full) or 2.5 (add), so the last eval interval (steps 11-12) means
    2.115 for full and 2.5 for add."""
    out = crossing_trial(cfg, workdir, on_eval)
    with (workdir / "metrics.jsonl").open("w") as f:
        for step in range(1, 13):
            ce = 2.5 if cfg.model.injection == "add" else 2.0 + 0.01 * step
            f.write(json.dumps({"step": step, "train/ce": ce}) + "\n")
            f.write(json.dumps({"step": step, "eval/ce": 9.0}) + "\n")  # an eval line: not training ce
    return out


def test_records_carry_the_train_curve_and_the_report_the_gap(tmp_path):
    spec = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}}, seeds=[0, 1], pruner=None)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=logging_trial)
    full = next(m for m in manifest.read_all(wd) if m["group"] == "full" and m["seed"] == 0)
    # windows (0, 2], (2, 4], ...: the mean of two logged steps each
    assert [t["step"] for t in full["train"]] == [2, 4, 6, 8, 10, 12] and {t["n"] for t in full["train"]} == {2}
    assert full["train"][0]["ce"] == pytest.approx(2.015) and full["train"][-1]["ce"] == pytest.approx(2.115)
    text = (wd / "REPORT.md").read_text()
    ev = 3.0 - 0.12 + 0.0005 + 0.02  # full at step 12, mean of seeds 0 and 1, depth 2
    assert f"| full | 2 | 2.1150 | {ev:.4f} | {ev - 2.115:+.4f} |" in text
    # A record from before the field: filled in from the trial's log when the sweep runs again.
    path = manifest.record_path(wd, full["key"])
    rec = json.loads(path.read_text())
    del rec["train"]
    path.write_text(json.dumps(rec))
    assert manifest.add_train_curves(wd) == 1
    assert json.loads(path.read_text())["train"] == full["train"]
    assert manifest.add_train_curves(wd) == 0
