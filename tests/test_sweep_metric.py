"""The sweep metric: registry facts, eval records, and metric@depth read at that depth or refused."""

from __future__ import annotations

import pytest
import test_sweep_helpers as helpers
from test_sweep_helpers import fake_metrics, fake_trial, write_spec

from asura.sweep import manifest
from asura.sweep.metrics import DEFAULT_METRIC, METRICS, MetricMissing, MetricSpec, metric_value
from asura.sweep.runner import run_sweep
from asura.sweep.spec import SpecError, load_spec
from asura.sweep.trainer import parse_eval


@pytest.fixture(autouse=True)
def _reset():
    helpers.EXECUTIONS.clear()


def _metric(name: str, depth: int | None = None) -> MetricSpec:
    return MetricSpec(name, depth, METRICS[name])


def test_registry_facts():
    assert METRICS.names == ("ce", "exact_match", "accuracy", "objective")
    assert DEFAULT_METRIC == "ce"
    assert {n: METRICS[n].direction for n in METRICS} == {
        "ce": "minimize", "exact_match": "maximize", "accuracy": "maximize", "objective": "minimize",
    }  # fmt: skip
    # Every entry reads a key the train loop writes (eval/d{n}/{key}); none reads the retired `loss`.
    assert {METRICS[n].key for n in METRICS} <= {"ce", "accuracy", "exact_match", "objective", "z_loss", "tokens"}
    assert METRICS["objective"].same_config == ("model.guidance", "model.guidance_weights", "model.z_loss")
    assert all(not METRICS[n].same_config for n in ("ce", "exact_match", "accuracy"))
    with pytest.raises(ValueError, match="metric='loss' is not valid; choose one of ce, exact_match"):
        METRICS["loss"]


def test_spec_metric_default_and_direction(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    assert spec.metric == _metric("ce") and spec.metric.direction == "minimize" and spec.metric.label == "ce"
    spec = load_spec(write_spec(tmp_path, metric="exact_match@1"))
    assert spec.metric.depth == 1 and spec.metric.direction == "maximize" and spec.metric.label == "exact_match@1"


def test_parse_eval_reads_depth_keyed_names():
    record = {"step": 6, "eval/d1/ce": 2.5, "eval/d2/ce": 2.0, "eval/d2/objective": 2.2, "eval/ce": 2.0,
              "eval/d2/tokens": 256, "train/loss": 3.0, "eval/d2/note": "text"}  # fmt: skip
    ev = parse_eval(record)
    assert ev.step == 6 and ev.depths == {1: {"ce": 2.5}, 2: {"ce": 2.0, "objective": 2.2, "tokens": 256.0}}
    assert parse_eval({"step": 6, "train/loss": 3.0, "eval/ce": 2.0}) is None  # no depth-keyed eval: not an eval


def test_metric_value_reads_exactly_the_named_depth():
    depths = {1: fake_metrics_at(1), 2: fake_metrics_at(2), 4: fake_metrics_at(4)}
    assert metric_value(_metric("ce"), 2, depths) == depths[2]["ce"]  # the training depth
    assert metric_value(_metric("ce", 4), 2, depths) == depths[4]["ce"]
    assert metric_value(_metric("exact_match", 1), 2, {"1": {"exact_match": 0.5}}) == 0.5  # JSON string keys


@pytest.mark.parametrize(("metric", "iterations"), [(("ce", 3), 2), (("ce", 5), 2), (("ce", None), 3)])
def test_metric_value_never_falls_back_to_another_depth(metric, iterations):
    # The old reader returned depth 2 for @3 (largest below), depth 4 for @5 and depth 2 for a
    # training depth of 3: a number from a depth nobody asked for, under the requested header.
    depths = {1: fake_metrics_at(1), 2: fake_metrics_at(2), 4: fake_metrics_at(4)}
    with pytest.raises(MetricMissing) as e:
        metric_value(_metric(*metric), iterations, depths)
    assert "evaluated depths [1, 2, 4]" in str(e.value) and "\n" not in str(e.value)


def test_metric_value_missing_name_is_an_error():
    with pytest.raises(MetricMissing, match=r"eval/d2/ce is missing; the eval recorded \['loss'\]"):
        metric_value(_metric("ce"), 2, {2: {"loss": 1.0}})


def fake_metrics_at(depth: int) -> dict[str, float]:
    return {"ce": 3.0 - 0.1 * depth, "exact_match": 0.1 * depth}


def test_trial_missing_its_depth_fails_with_a_clear_message(tmp_path):
    """Run time: an eval without the trial's depth fails the trial; it is never read at another depth."""

    def shallow(cfg, workdir, on_eval):  # evaluates depth 1 only, though the trial trains at depth 2
        helpers.EXECUTIONS.append("shallow")
        on_eval(6, {1: fake_metrics(cfg, 6, 1)})
        return {"final": {1: fake_metrics(cfg, 12, 1)}, "step": 12}

    wd = run_sweep(write_spec(tmp_path, pruner=None), tmp_path / "run", trial_fn=shallow, report=False)
    (m,) = manifest.read_all(wd)
    assert m["status"] == "failed" and m["value"] is None, m
    assert m["error"] == (
        "MetricMissing: ce: the eval has no depth 2 (the training depth model.iterations); it evaluated depths [1]"
    )


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        # TINY: max_iterations = iterations = 2, so every trial evaluates depths 1 and 2.
        ({"metric": "ce@3"}, "metric=ce@3: trial base|seed=0 evaluates depths [1, 2]"),
        (
            {"metric": "ce@2", "variants": {"looped": {}}, "baselines": ["iso_flop_depth"]},
            "metric=ce@2: baseline iso_flop_depth(looped)|seed=0 evaluates depths [1]",
        ),
        (
            {"metric": "ce@3", "search": {"n_trials": 2, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}},
            "metric=ce@3: search.params.train.lr=0.001 evaluates depths [1, 2]",
        ),
    ],
)
def test_metric_depth_every_trial_does_not_evaluate_is_refused_at_load(tmp_path, fields, needle):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, **fields))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_metric_depth_evaluated_by_every_trial_loads_and_is_read_there(tmp_path):
    over = {**helpers.TINY, "model.max_iterations": 3, "train.eval_depths": [1, 3]}
    spec = write_spec(tmp_path, overrides=over, metric="ce@3", axes={"model.injection": ["projconcat", "add"]})
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    ms = manifest.read_all(wd)
    assert [m["status"] for m in ms] == ["complete", "complete"]
    assert all(set(m["final"]) == {"1", "2", "3"} and m["value"] == m["final"]["3"]["ce"] for m in ms)
    assert all(m["metric"] == "ce@3" for m in ms)


# optuna warns that list-valued choices may not persist in every storage; sqlite stores them as JSON.
@pytest.mark.filterwarnings("ignore:Choices for a categorical distribution:UserWarning")
def test_search_combination_without_the_depth_fails_before_training(tmp_path):
    # Each searched value alone keeps depth 3 (so the spec loads), but together they drop it.
    over = {**helpers.TINY, "model.max_iterations": 3, "model.iterations": 3}
    search = {"method": "random", "n_trials": 1, "params": {"train.eval_depths": {"choices": [[1, 2]]},
              "model.iterations": {"choices": [2]}}}  # fmt: skip
    spec = write_spec(tmp_path, overrides=over, metric="ce@3", search=search, pruner=None)
    wd = run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, max_trials=1, report=False)
    (m,) = manifest.read_all(wd)
    assert m["status"] == "failed" and helpers.EXECUTIONS == []  # never trained
    assert m["error"] == "MetricMissing: ce@3: this trial evaluates depths [1, 2], not 3"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"variants": {"full": {}, "no_z_loss": {"model.z_loss": 0.0}}},
            "trial full|seed=0 has model.z_loss=0.0001 but trial no_z_loss|seed=0 has 0.0",
        ),
        (
            {"variants": {"full": {"model.guidance": "linear"}}, "baselines": ["iso_flop_depth"]},
            "trial full|seed=0 has model.guidance='linear' but baseline iso_flop_depth(full)|seed=0 has 'none'",
        ),
        (
            {"search": {"n_trials": 2, "params": {"model.z_loss": {"choices": [0.0, 1e-4]}}}},
            "search.params.model.z_loss=0.0 has model.z_loss=0.0 but search.params.model.z_loss=0.0001 has 0.0001",
        ),
    ],
)
def test_objective_refused_when_trials_differ_in_what_it_weighs(tmp_path, fields, needle):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, metric="objective", **fields))
    msg = str(e.value)
    assert msg.startswith("metric=objective (the training objective") and needle in msg, msg
    assert "only comparable between runs with the same model.guidance, model.guidance_weights, model.z_loss" in msg
    assert "\n" not in msg
    load_spec(write_spec(tmp_path, metric="ce", **fields))  # ce compares across them


def test_objective_allowed_when_trials_agree(tmp_path):
    spec = load_spec(write_spec(tmp_path, metric="objective", axes={"model.injection": ["projconcat", "add"]}))
    assert spec.metric.name == "objective" and len(spec.grid.cells) == 2


def test_trial_child_gets_huge_pages_unless_the_user_set_tunables(tmp_path, monkeypatch):
    """subprocess_trial starts train.py with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (a CPU step was
    mostly page faults without it); a value the user exported is kept."""
    import subprocess

    from asura.config.schema import Config
    from asura.sweep import trainer

    seen = []

    class Child:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            seen.append(env)
            (tmp_path / "w" / "metrics.jsonl").write_text('{"step": 500, "eval/d1/ce": 1.0}\n')  # Config's steps

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    trainer.subprocess_trial(Config(), tmp_path / "w", lambda step, depths: None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    trainer.subprocess_trial(Config(), tmp_path / "w", lambda step, depths: None)
    assert [e["GLIBC_TUNABLES"] for e in seen] == ["glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2"]


def test_a_trial_stopped_early_by_a_signal_is_not_complete(tmp_path, monkeypatch):
    """train.py exits 0 after SIGTERM (it saves and stops): a trial whose last eval is before
    train.steps failed, so a resumed sweep reruns it instead of tabulating a half-trained run."""
    import subprocess

    from asura.config.schema import Config
    from asura.sweep import trainer

    class Child:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            (tmp_path / "w" / "metrics.jsonl").write_text('{"step": 150, "eval/d1/ce": 1.0}\n')

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    with pytest.raises(RuntimeError, match=r"train\.py stopped at step 150 of 500"):
        trainer.subprocess_trial(Config(), tmp_path / "w", lambda step, depths: None)
