"""Studies under a protocol: Holm, Wilcoxon and Fisher against hand-worked values; the protocol
checked at load, registered on the first run and refused when changed; the report's verdicts from
the protocol's seeds and family only; records that regenerate a report and resume a study alone."""

from __future__ import annotations

import json
import shutil

import pytest
from test_sweep_helpers import fake_metrics, write_spec

from asura.depth import eval_depths
from asura.sweep import manifest
from asura.sweep.keys import SpecError
from asura.sweep.report import write_report
from asura.sweep.runner import ResumeRefused, run_sweep
from asura.sweep.spec import load_spec
from asura.sweep.stats import clip_interval, holm, learned_rates, signed_rank_p

# ------------------------------------------------------------------ the tests' numbers


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(2·0.03, 1·0.04)
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": None})
    assert got == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06),
                   "d": pytest.approx(0.02), "e": None}  # fmt: skip
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}  # capped at 1, and monotone
    assert holm({}) == {}


def test_signed_rank_floor_and_fisher_by_hand():
    a = {s: 1.0 + s for s in range(5)}
    b = {s: 0.5 + s for s in range(5)}
    assert signed_rank_p(a, b) == pytest.approx(2 / 2**5)  # 5 seeds, all one sign: the smallest p
    a8 = {s: 1.0 + 0.1 * s for s in range(8)}
    assert signed_rank_p(a8, {s: 0.0 for s in range(8)}) == pytest.approx(2 / 2**8)
    assert signed_rank_p({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) is None  # no nonzero difference
    lr = learned_rates([0.95] * 8, [0.2] * 8, 0.9, "maximize")
    assert (lr.k_a, lr.n_a, lr.k_b, lr.n_b) == (8, 8, 0, 8)
    assert lr.p == pytest.approx(2 / 12870)  # hypergeometric: both extreme tables of C(16, 8)
    assert learned_rates([0.1, 0.3], [0.1], 0.2, "minimize").k_a == 1


def test_intervals_are_cut_to_the_metric_range():
    assert clip_interval(-0.2, 1.3, (0.0, 1.0)) == (0.0, 1.0)
    assert clip_interval(-0.2, 1.3, (0.0, None)) == (0.0, 1.3)


# ------------------------------------------------------------------ the protocol in the spec

EFFECT = {"full": 0.0, "add": 0.3, "none": 0.02}  # add is clearly worse; none slightly, within noise
NOISE = [0.00, 0.05, -0.04, 0.03, -0.02, 0.01, -0.03, 0.04, 0.2, -0.3]  # per seed, shared by every arm
OWN = [0.011, -0.007, 0.004, -0.012, 0.009, -0.003, 0.006, -0.010, 0.0, 0.0]
CALLS: list[str] = []


def trial(cfg, workdir, on_eval) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    inj, seed = cfg.model.injection, cfg.train.seed
    CALLS.append(f"{inj}|{seed}")
    group = {"projconcat": "full", "add": "add", "none": "none"}[inj]
    final = {}
    for d in eval_depths(cfg):
        m = fake_metrics(cfg, cfg.train.steps, d)
        m["ce"] = 3.0 + EFFECT[group] + NOISE[seed] + (OWN[seed] if group != "full" else 0.0) * (1 + d)
        final[d] = m
    on_eval(cfg.train.steps, final)
    return {"final": final, "step": cfg.train.steps}


VARIANTS = {"full": {}, "add": {"model.injection": "add"}, "none": {"model.injection": "none"}}


def spec_with(tmp_path, protocol, seeds=tuple(range(10)), name="spec", **kw):
    return write_spec(tmp_path, name=name, variants=VARIANTS, seeds=list(seeds), pruner=None, reference="full",
                      protocol=protocol, **kw)  # fmt: skip


@pytest.mark.parametrize(
    ("protocol", "needle"),
    [
        ({"seeds": [0, 1, 11]}, r"protocol.seeds \[11\] are not in the spec's seeds"),
        ({"seeds": [0, 1], "min_seeds": 2, "family": ["nope"]}, r"protocol.family names \['nope'\], not groups"),
        ({"seeds": [0, 1], "min_seeds": 2, "family": ["full"]}, r"includes the reference 'full'"),
        ({"seeds": [0, 1], "min_seeds": 3}, r"min_seeds must be an integer in \[2, 2\]"),
        ({"seeds": [0, 1], "min_seeds": 2, "learned": -1}, r"learned must be a number in the metric's range \[0.0"),
        ({"seeds": [0, 1], "alpha": 0.1}, r"protocol: unknown key 'alpha'"),
        ({"seeds": [0, 1]}, r"min_seeds must be an integer in \[2, 2\] \(its seeds\), got 5"),  # the default 5
    ],
)
def test_a_bad_protocol_is_one_line_at_load(tmp_path, protocol, needle):
    with pytest.raises(SpecError, match=needle):
        load_spec(spec_with(tmp_path, protocol))
    with pytest.raises(SpecError, match="a pruned trial would drop a pre-registered seed"):
        load_spec(write_spec(tmp_path, name="p", variants=VARIANTS, seeds=[0, 1, 2, 3, 4],
                             protocol={"seeds": [0, 1, 2, 3, 4]}))  # fmt: skip


def test_verdicts_come_from_the_protocol_seeds_and_family_only(tmp_path):
    """Seeds 8 and 9 (outside the protocol) carry large noise that would change the numbers; `none`
    is outside the family, so it is exploratory and does not count in the correction."""
    protocol = {"seeds": list(range(8)), "family": ["add"], "min_seeds": 8}
    wd = tmp_path / "run"
    out = run_sweep(spec_with(tmp_path, protocol), wd, trial_fn=trial)
    rows = {r["group"]: r for r in write_report(out)["rows"]}
    add, none = rows["add"], rows["none"]
    assert add["confirmatory"] and not none["confirmatory"]
    assert add["n_tested"] == 8 and add["delta"] == pytest.approx(0.3 + sum(OWN[:8]) * 3 / 8)  # depth 2: (1 + d) = 3
    assert add["p_holm"] == add["p"]  # a family of one
    assert add["p_wilcoxon"] == pytest.approx(2 / 2**8)  # add is worse in all 8 seeds: 0.3 + 3·OWN > 0
    assert add["verdict"].startswith("full beats add by ") and "Holm p" in add["verdict"]
    assert none["verdict"].startswith("exploratory: ") and none["p_holm"] is None
    text = (out / "REPORT.md").read_text()
    assert "Registered at commit" in text and "before any trial had run" in text
    assert "- confirmatory seeds: [0, 1, 2, 3, 4, 5, 6, 7]; minimum per arm: 8" in text
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["protocol"]["protocol"] == {"seeds": list(range(8)), "family": ["add"], "min_seeds": 8, "learned": None}
    # Another metric than the primary one: the same family and correction, but nothing confirmatory.
    add = {r["group"]: r for r in write_report(out, "objective")["rows"]}["add"]
    assert not add["confirmatory"] and add["verdict"].startswith("exploratory: ") and add["p_holm"] == add["p"]
    text = (out / "REPORT_objective.md").read_text()
    assert "is not the primary metric: **every verdict below is exploratory**" in text


def test_a_changed_protocol_is_refused_and_a_late_one_is_marked(tmp_path):
    wd = tmp_path / "run"
    run_sweep(spec_with(tmp_path, {"seeds": [0, 1, 2, 3, 4]}, seeds=range(5)), wd, trial_fn=trial)
    with pytest.raises(ResumeRefused, match="registered another protocol"):
        run_sweep(spec_with(tmp_path, {"seeds": [0, 1, 2, 3], "min_seeds": 4}, seeds=range(5)), wd, trial_fn=trial)
    late = tmp_path / "late"
    run_sweep(spec_with(tmp_path, None, seeds=range(5), name="plain"), late, trial_fn=trial)
    run_sweep(spec_with(tmp_path, {"seeds": [0, 1, 2, 3, 4]}, seeds=range(5), name="then"), late, trial_fn=trial)
    text = (late / "REPORT.md").read_text()
    assert "before 15 trials had run" in text and "Registered late" in text


# ------------------------------------------------------------------ records


def test_a_report_regenerates_from_the_records_alone_and_a_study_resumes_from_them(tmp_path):
    wd = tmp_path / "run"
    spec = spec_with(tmp_path, {"seeds": [0, 1, 2, 3, 4]}, seeds=range(5))
    run_sweep(spec, wd, trial_fn=trial)
    files = ["REPORT.md", "summary.md", "summary.csv", "plots/ablation.png", "plots/metric_vs_flops.png"]
    before = {f: (wd / f).read_bytes() for f in files}
    records = sorted(p.name for p in (wd / manifest.RECORDS).iterdir())
    assert len(records) == 15 and "add__seed=0.json" in records
    rec = json.loads((wd / manifest.RECORDS / "add__seed=0.json").read_text())
    assert rec["environment"]["packages"]["jax"] and rec["commit"] and rec["config_hash"] and rec["evals"]
    # What is not committed goes: the trials' workdirs and the optuna database; the report is the same.
    shutil.rmtree(wd / "trials")
    (wd / "study.db").unlink()
    for f in files:
        (wd / f).unlink()
    write_report(wd)
    for f in files:
        assert (wd / f).read_bytes() == before[f], f
    # Another machine: the committed part only (records, sweep.json); finished cells do not rerun.
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(wd / manifest.RECORDS, clone / manifest.RECORDS)
    shutil.copy(wd / "sweep.json", clone / "sweep.json")
    CALLS.clear()
    run_sweep(spec, clone, trial_fn=trial)  # every cell's record is complete with its config: nothing reruns
    assert CALLS == []
    # A cell whose record does not match its config any more (here: its record removed) reruns alone.
    (clone / manifest.RECORDS / "add__seed=3.json").unlink()
    run_sweep(spec, clone, trial_fn=trial)
    assert CALLS == ["add|3"]
    # Records from before a config field existed (the field missing, the hash of the older schema):
    # at its default the run is the same and does not rerun; set away from its default, it does.
    for name, field in (("full__seed=1.json", "rope_theta"), ("add__seed=2.json", "injection")):
        path = clone / manifest.RECORDS / name
        rec = json.loads(path.read_text())
        del rec["config"]["model"][field]
        rec["config_hash"] = "0ld5chema000"
        path.write_text(json.dumps(rec))
    CALLS.clear()
    run_sweep(spec, clone, trial_fn=trial)
    assert CALLS == ["add|2"]  # model.injection=add is not the default: not provably the same run
    path = clone / manifest.RECORDS / "full__seed=4.json"  # a record with no config: never assumed the same
    rec = json.loads(path.read_text())
    del rec["config"]
    rec["config_hash"] = "0ld5chema000"
    path.write_text(json.dumps(rec))
    CALLS.clear()
    run_sweep(spec, clone, trial_fn=trial)
    assert CALLS == ["projconcat|4"]


# ------------------------------------------------------------------ the learning rate, tuned per arm

BEST_LR = {"full": 1e-3, "add": 1e-2, "none": 3e-3}  # each arm's own optimum


def lr_trial(cfg, workdir, on_eval) -> dict:
    """ce is lowest at the arm's own best lr (quadratic in log10 lr), plus seed noise."""
    import math

    workdir.mkdir(parents=True, exist_ok=True)
    group = {"projconcat": "full", "add": "add", "none": "none"}[cfg.model.injection]
    CALLS.append(f"{group}|{cfg.train.lr:g}|{cfg.train.seed}")
    off = math.log10(cfg.train.lr) - math.log10(BEST_LR[group])
    final = {}
    for d in eval_depths(cfg):
        m = fake_metrics(cfg, cfg.train.steps, d)
        m["ce"] = 3.0 + off**2 + 0.001 * (cfg.train.seed % 7)
        final[d] = m
    on_eval(cfg.train.steps, final)
    return {"final": final, "step": cfg.train.steps}


@pytest.mark.parametrize(
    ("tune", "needle"),
    [
        ({"lr": [1e-3, 1e-2], "seeds": [3, 100]}, r"tune.seeds \[3\] are also the sweep's seeds"),
        ({"lr": [1e-3], "seeds": [100]}, r"tune.lr must be a list of at least 2 learning rates > 0"),
        ({"lr": [1e-3, -1.0], "seeds": [100]}, r"tune.lr must be a list"),
        ({"lr": [1e-3, 1e-2]}, r"tune.seeds must be a non-empty list"),
    ],
)
def test_a_bad_tuning_grid_is_one_line_at_load(tmp_path, tune, needle):
    with pytest.raises(SpecError, match=needle):
        load_spec(spec_with(tmp_path, None, seeds=range(5), tune=tune))


def test_each_arm_trains_at_the_lr_it_scored_best_with_on_its_tuning_seeds(tmp_path, capsys):
    tune = {"lr": [1e-2, 1e-3, 3e-3], "seeds": [100, 101]}
    spec = spec_with(tmp_path, {"seeds": [0, 1, 2, 3, 4]}, seeds=range(5), tune=tune)
    CALLS.clear()
    wd = run_sweep(spec, tmp_path / "run", trial_fn=lr_trial)
    said = [line for line in capsys.readouterr().out.splitlines() if " to run -> " in line]
    assert [s.split(": ")[1].split(" ->")[0] for s in said] == [  # the tuning trials are not the sweep's own
        "18 trials, 0 done, 18 to run",
        "15 trials, 0 done, 15 to run",
    ]
    assert len(json.loads((wd / "sweep.json").read_text())["commands"]) == 1  # one invocation, two phases
    tuning = [c for c in CALLS if c.split("|")[2] in ("100", "101")]
    assert len(tuning) == 3 * 3 * 2 and CALLS[: len(tuning)] == tuning  # every group x lr x seed, first
    main = CALLS[len(tuning) :]
    assert sorted(main) == sorted(f"{g}|{BEST_LR[g]:g}|{s}" for g in BEST_LR for s in range(5))
    rows = {r["group"]: r for r in write_report(wd)["rows"]}
    assert set(rows) == {"full", "add", "none"}  # the tuning trials are not rows of the comparison
    assert all(set(r["by_seed"]) == set(range(5)) for r in rows.values())
    text = (wd / "REPORT.md").read_text()
    assert "## Learning-rate tuning" in text and "| add | 4.0025 | 3.2759 | 3.0025 | 0.01 |" in text
    CALLS.clear()
    run_sweep(spec, wd, trial_fn=lr_trial)  # a rerun: both phases are complete
    assert CALLS == []
    with pytest.raises(ResumeRefused, match="a changed tuning grid is a new study"):
        run_sweep(spec_with(tmp_path, {"seeds": [0, 1, 2, 3, 4]}, seeds=range(5), name="t2",
                            tune={"lr": [1e-2, 1e-3], "seeds": [100, 101]}), wd, trial_fn=lr_trial)  # fmt: skip


def test_choose_waits_for_every_lr_and_seed_and_breaks_ties_low():
    from asura.sweep.tuning import TuneSpec, choose

    tune = TuneSpec((1e-3, 1e-2), (100, 101))

    def rec(lr, seed, value, group="g"):
        return {"role": "tune", "status": "complete", "value": value, "parent": group, "seed": seed,
                "config": {"train": {"lr": lr}}}  # fmt: skip

    full = [rec(1e-3, 100, 2.0), rec(1e-3, 101, 2.0), rec(1e-2, 100, 2.0), rec(1e-2, 101, 2.0)]
    assert choose(full, tune, "minimize")["g"]["lr"] == 1e-3  # a tie goes to the smaller lr
    assert choose(full[:3], tune, "minimize") == {}  # one lr lacks a seed: not chosen yet
    best_high = [*full[:2], rec(1e-2, 100, 0.9), rec(1e-2, 101, 0.7)]
    assert choose(best_high, tune, "minimize")["g"]["lr"] == 1e-2  # 0.8 < 2.0
    assert choose(best_high, tune, "maximize")["g"]["lr"] == 1e-3  # 2.0 > 0.8
    assert choose([*full[:2], rec(1e-2, 100, 3.0), rec(1e-2, 101, 3.0)], tune, "maximize")["g"]["lr"] == 1e-2


def test_same_config_assumes_only_defaults_of_fields_a_record_predates():
    from asura.config.load import config_to_dict, with_overrides
    from asura.config.schema import Config

    cfg = with_overrides(Config(), {"train.lr": 0.01})
    rec = json.loads(json.dumps(config_to_dict(cfg)))
    assert manifest.same_config(rec, cfg)
    del rec["model"]["position"]  # a field added after the record, at its default: the same run
    assert manifest.same_config(rec, cfg)
    del rec["train"]["lr"]  # a field set away from its default: not provably the same
    assert not manifest.same_config(rec, cfg)
    # No config at all, or a whole section gone, proves nothing (even for an all-default config).
    assert not manifest.same_config(None, Config()) and not manifest.same_config({}, Config())
    assert not manifest.same_config({k: v for k, v in config_to_dict(Config()).items() if k != "train"}, Config())
