"""A running sweep prints one line per trial start, finish, prune or failure; optuna's own per-trial
log (INFO lines, a warning with a traceback per failed trial) is not printed besides."""

from __future__ import annotations

import re

from test_sweep_helpers import fake_trial, write_spec

from asura.sweep.runner import run_sweep

AXES = {"model.injection": ["projconcat", "add", "none"]}


def _lines(out: str, event: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(rf"trial \d+/\d+ {event}: ", line)]


def test_every_trial_starts_and_finishes_with_its_metric_and_time(tmp_path, capfd):
    spec = write_spec(tmp_path, axes=AXES, pruner=None)
    run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    out, err = capfd.readouterr()
    started, finished = _lines(out, "started"), _lines(out, "finished")
    keys = [f"injection={v}|seed=0" for v in AXES["model.injection"]]
    assert started == [f"trial {i}/3 started: {k} (model.injection={k[10:].split('|')[0]})"
                       for i, k in enumerate(keys, 1)]  # fmt: skip
    assert [line.split(" ce=")[0] for line in finished] == [f"trial {i}/3 finished: {k}" for i, k in enumerate(keys, 1)]
    assert all(re.search(r" ce=[\d.]+ in [\d.]+ s$", line) for line in finished), finished
    assert "sweep spec: 3 trials, 0 done, 3 to run" in out
    assert "[I " not in err and "A new study created" not in err, err  # optuna's INFO log is off


def test_a_failed_trial_is_one_line_with_its_reason_and_no_traceback(tmp_path, capfd):
    spec = write_spec(tmp_path, axes=AXES, pruner=None)

    def flaky(cfg, workdir, on_eval):
        if cfg.model.injection == "add":
            raise RuntimeError("train.py exited 1: boom\nTraceback (most recent call last): ...")
        return fake_trial(cfg, workdir, on_eval)

    run_sweep(spec, tmp_path / "run", trial_fn=flaky, report=False)
    out, err = capfd.readouterr()
    (failed,) = _lines(out, "failed")
    want = r"trial 2/3 failed: injection=add\|seed=0 after [\d.]+ s: RuntimeError: train\.py exited 1: boom"
    assert re.fullmatch(want, failed), failed
    assert len(_lines(out, "finished")) == 2
    assert "Traceback" not in err and "Trial 1 failed" not in err, err


def test_a_pruned_trial_says_where_it_stopped(tmp_path, capfd):
    spec = write_spec(tmp_path, axes=AXES, pruner={"percentile": 50, "warmup_evals": 0, "startup_trials": 2})
    run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    out, err = capfd.readouterr()
    (pruned,) = _lines(out, "pruned")
    assert re.fullmatch(r"trial 3/3 pruned: injection=none\|seed=0 at eval 0 \(step 6\): ce=[\d.]+ after [\d.]+ s",
                        pruned), pruned  # fmt: skip
    assert "pruned" not in err, err


def test_a_resumed_sweep_counts_what_is_done(tmp_path, capfd):
    spec = write_spec(tmp_path, axes=AXES, pruner=None)
    run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, max_trials=1, report=False)
    capfd.readouterr()
    run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    out, _ = capfd.readouterr()
    assert "sweep spec: 3 trials, 1 done, 2 to run" in out
    assert [line.split(":")[0] for line in _lines(out, "started")] == ["trial 2/3 started", "trial 3/3 started"]


def test_a_search_counts_trials_up_to_n_trials(tmp_path, capfd):
    search = {"method": "random", "n_trials": 2, "params": {"model.injection": {"choices": ["projconcat", "add"]}}}
    run_sweep(write_spec(tmp_path, search=search, pruner=None), tmp_path / "run", trial_fn=fake_trial, report=False)
    out, _ = capfd.readouterr()
    started = _lines(out, "started")
    assert [line.split(": ")[0] for line in started] == ["trial 1/2 started", "trial 2/2 started"]
    assert all(re.search(r"\(model\.injection=(projconcat|add)\)$", line) for line in started), started
    assert len(_lines(out, "finished")) == 2
