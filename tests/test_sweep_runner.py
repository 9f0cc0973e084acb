"""Sweep runner with a fake trial function: end to end, resume, pruning, search, report consistency."""

from __future__ import annotations

import csv
import json
import statistics

import optuna
import pytest
import test_sweep_helpers as helpers
from optuna.trial import TrialState
from test_sweep_helpers import fake_trial, write_spec

from asura.sweep import manifest
from asura.sweep.runner import open_study, prepare, run_sweep
from asura.sweep.spec import load_spec


@pytest.fixture(autouse=True)
def _reset():
    helpers.EXECUTIONS.clear()


def _states(spec_path, wd):
    study = open_study(load_spec(spec_path), wd)
    return [(t.user_attrs.get("cell"), t.state) for t in study.get_trials()]


def test_grid_end_to_end_fake(tmp_path):
    spec = write_spec(tmp_path, variants={"full": {}, "add": {"model.injection": "add"}}, seeds=[0, 1], pruner=None)
    wd = run_sweep(spec, tmp_path / "run", baselines=True, trial_fn=fake_trial)
    ms = manifest.read_all(wd)
    # 4 trials + 2 iso_flop_depth (one per seed, shared by both variants) + 4 iso_flop_width (per variant)
    assert len(ms) == 10 and all(m["status"] == "complete" for m in ms)
    m = ms[0]
    for key in ("params_unique", "flops_per_token_fwd", "flops_per_token_train", "tokens_seen", "depth_pmf", "bptt_k"):
        assert key in m
    assert m["tokens_seen"] == 12 * 8 * 32 and m["depth_pmf"] == {"2": 1.0}
    assert set(m["final"]) == {"1", "2"} and m["config"]["model"]["d_model"] == 32
    rows = {r["group"]: r for r in csv.DictReader((wd / "summary.csv").open())}
    assert set(rows) == {"full", "add", "iso_flop_depth(full)", "iso_flop_width(full)", "iso_flop_width(add)"}
    assert rows["iso_flop_width(full)"]["label"] == rows["iso_flop_width(add)"]["label"] == "iso-FLOP"
    full = [x["value"] for x in ms if x["group"] == "full"]
    assert float(rows["full"]["value"]) == pytest.approx(statistics.fmean(full))
    assert float(rows["full"]["std"]) == pytest.approx(statistics.stdev(full))
    assert rows["full"]["label"] == "reference"
    assert rows["iso_flop_depth(full)"]["reference"] == "full"
    md = (wd / "summary.md").read_text()
    assert "iso_param(full)" in md and "Impossible baselines" in md  # impossible baselines are listed
    assert len(list(csv.DictReader((wd / "trials.csv").open()))) == 10
    for png in ("metric_vs_flops.png", "metric_vs_params.png", "ablation.png"):
        assert (wd / "plots" / png).stat().st_size > 1000
    # Rerunning a finished sweep runs nothing.
    run_sweep(spec, wd, baselines=True, trial_fn=fake_trial, report=False)
    assert len(helpers.EXECUTIONS) == 10


def test_resume_skips_finished_and_reruns_interrupted(tmp_path):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add", "none"]}, seeds=[0, 1], pruner=None)
    wd = tmp_path / "run"
    run_sweep(spec, wd, trial_fn=fake_trial, max_trials=2, report=False)  # "interrupted" after 2 trials
    assert len(helpers.EXECUTIONS) == 2

    def interrupting(cfg, workdir, on_eval):
        if len(helpers.EXECUTIONS) == 3:  # Ctrl-C during the 4th trial
            raise KeyboardInterrupt
        return fake_trial(cfg, workdir, on_eval)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, wd, trial_fn=interrupting, report=False)
    assert len(helpers.EXECUTIONS) == 3
    assert sum(s == TrialState.FAIL for _, s in _states(spec, wd)) == 1
    # A worker killed hard leaves its trial RUNNING: simulate one and requeue it with fail_running.
    study = prepare(load_spec(spec), wd)
    with pytest.warns(UserWarning, match="Heartbeat"):
        stuck = study.ask()  # pops a waiting cell -> RUNNING, never finished
    run_sweep(spec, wd, trial_fn=fake_trial, fail_running=True, report=False)
    ex = helpers.EXECUTIONS
    assert len(ex) == 3 + 3 and len(set(ex)) == 6  # the 3 unfinished cells once each; the first 3 never again
    states = _states(spec, wd)
    done = [c for c, s in states if s == TrialState.COMPLETE]
    assert sorted(done) == sorted({c for c, _ in states}) and len(done) == 6
    assert dict((t.number, t.state) for t in study.get_trials())[stuck.number] == TrialState.FAIL


def test_pruner_prunes_a_clearly_worse_trial(tmp_path):
    # Cells run in queue order: two good trials first, then the clearly worse injection=none.
    spec = write_spec(
        tmp_path,
        axes={"model.injection": ["projconcat", "add", "none"]},
        pruner={"percentile": 50, "warmup_evals": 0, "startup_trials": 2},
    )
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial)
    states = dict(_states(spec, wd))
    assert states["injection=none|seed=0"] == TrialState.PRUNED
    assert states["injection=projconcat|seed=0"] == TrialState.COMPLETE
    m = {x["key"]: x for x in manifest.read_all(wd)}["injection=none|seed=0"]
    assert m["status"] == "pruned" and len(m["evals"]) == 1  # stopped at its first eval
    assert "1 pruned" in (wd / "summary.md").read_text()


def test_no_pruner_keeps_every_trial(tmp_path):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add", "none"]}, pruner=None)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    assert all(s == TrialState.COMPLETE for _, s in _states(spec, wd))


def test_search_resumes_to_n_trials(tmp_path):
    search = {"method": "random", "n_trials": 3, "params": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
              "model.injection": {"choices": ["projconcat", "add"]}}}  # fmt: skip
    spec = write_spec(tmp_path, search=search, pruner=None)
    wd = tmp_path / "run"
    run_sweep(spec, wd, trial_fn=fake_trial, max_trials=2, report=False)
    run_sweep(spec, wd, trial_fn=fake_trial, report=False)
    run_sweep(spec, wd, trial_fn=fake_trial, report=False)
    assert len(helpers.EXECUTIONS) == 3
    ms = manifest.read_all(wd)
    assert [m["status"] for m in ms] == ["complete"] * 3
    assert all(1e-4 <= m["config"]["train"]["lr"] <= 1e-2 for m in ms)
    assert json.loads((wd / "sweep.json").read_text())["metric"] == "ce"


def test_failed_trial_is_recorded_and_sweep_continues(tmp_path):
    spec = write_spec(tmp_path, axes={"model.injection": ["projconcat", "add"]}, pruner=None)

    def flaky(cfg, workdir, on_eval):
        if cfg.model.injection == "add":
            raise RuntimeError("boom")
        return fake_trial(cfg, workdir, on_eval)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=flaky, report=False)
    ms = {m["key"]: m for m in manifest.read_all(wd)}
    assert ms["injection=add|seed=0"]["status"] == "failed" and "boom" in ms["injection=add|seed=0"]["error"]
    assert ms["injection=projconcat|seed=0"]["status"] == "complete"
    run_sweep(spec, wd, trial_fn=fake_trial, report=False)  # the failed cell reruns on the next invocation
    assert helpers.EXECUTIONS == ["projconcat|L=1|seed=0", "add|L=1|seed=0"]


def test_two_workers_cannot_pop_the_same_waiting_trial(tmp_path, monkeypatch):
    """The pop's read (WAITING) and write (RUNNING) are one transaction on sqlite.

    Both workers are held between the read and the write (a barrier inside optuna's read) so the
    interleaving that ran one trial twice under load happens every time. With plain pysqlite
    transactions both reads see WAITING and both pops succeed; with BEGIN IMMEDIATE the second
    worker's read waits for the first's commit, sees RUNNING and gives the trial up.
    """
    import contextlib
    import threading

    from optuna.storages._rdb import models

    from asura.sweep.runner import make_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="s")
    study.enqueue_trial({})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    workers = [make_storage(url) for _ in range(2)]  # separate engines, as in separate processes

    barrier = threading.Barrier(2, timeout=1.0)  # the blocked worker never arrives: go on after 1 s
    real = models.TrialModel.find_or_raise_by_id

    def held(trial_id, session, for_update=False):
        row = real(trial_id, session, for_update)
        with contextlib.suppress(threading.BrokenBarrierError):  # the other worker is blocked: go on
            barrier.wait()
        return row

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", held)
    won: list[bool] = []
    threads = [
        threading.Thread(target=lambda s=s: won.append(s.set_trial_state_values(trial_id, TrialState.RUNNING)))
        for s in workers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False, True]
