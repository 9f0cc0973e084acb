"""Training under per-token halting (depth.halt_*) and fine-tuning from another run (train.init_from).

The halting step is checked against a plain reference that needs no halting: "exit after k" trains
exactly like fixed depth k, so one optimiser step under `depth.halt_rule=steps` must equal one at
depth k bit for bit. init_from is checked as users run it: real runs in real workdirs, the step
pinned in config.yaml, a killed fine-tune resuming its own checkpoint (not the source again), and
every bad source refused in one line before the workdir is created.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quiet, stop_at, tiny_config
from test_train_step import batch_for

from asura.config import ConfigError, config_from_yaml
from asura.train.init_from import InitFromError
from asura.train.loop import FAST_COMPILE, run
from asura.train.optim import lr_schedule
from asura.train.preflight import PreflightError
from asura.train.state import init_state
from asura.train.step import make_train_step


def tiny(*extra: str):
    return tiny_config("model.max_iterations=3", "model.iterations=3", "model.guidance=none", *extra)


def one_step(cfg, n: int, halting=None):
    built = init_state(cfg)
    step = jax.jit(make_train_step(cfg, built.graphdef, built.rest, built.axes, halting=halting))
    return step(built.state, jax.tree.map(jnp.asarray, batch_for(cfg)), jnp.int32(n))


def test_training_under_exit_after_k_equals_training_at_depth_k():
    # both runs build the same init from train.seed; "exit after 2" at n=3 is depth 2 for every token
    ref_state, ref_m = one_step(tiny("train.lr=1e-2", "train.warmup_steps=0"), 2)
    cfg = tiny("train.lr=1e-2", "train.warmup_steps=0", "depth.halt_rule=steps", "depth.halt_threshold=2")
    state, m = one_step(cfg, 3)
    assert float(m["halt_depth"]) == 2.0  # every scored token ran 2 iterations
    assert float(m["objective"]) == float(ref_m["objective"])
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the update is not trivially zero: the step moved the parameters
    start = jax.tree.leaves(init_state(cfg).state["params"])
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state["params"]), start, strict=True)]
    assert max(moved) > 0


def test_training_under_the_gates_own_loss_trains_the_gate_from_the_start():
    # depth.halt_gate_loss: the gate rule needs no earlier phase, exit_entropy applies, the gate moves
    cfg = tiny("model.exit_gate=true", "model.exit_entropy=0.05", "depth.halt_rule=gate", "depth.halt_threshold=0.6",
               "depth.halt_gate_loss=true", "train.warmup_steps=0")  # fmt: skip
    state, m = one_step(cfg, 3)
    assert 1.0 <= float(m["halt_depth"]) < 3.0 and 1.0 <= float(m["exit_depth"]) <= 3.0
    start = init_state(cfg).state["params"]
    assert float(jnp.abs(state["params"]["w_gate"] - start["w_gate"]).max()) > 0


def test_training_under_the_gate_records_the_realised_depth():
    cfg = tiny("model.exit_gate=true", "depth.halt_rule=gate", "depth.halt_threshold=0.6", "depth.halt_from=1")
    _, m = one_step(cfg, 3, halting=True)
    # b = 0 at init: λ ≈ 1/2 per iteration, so cumulative exit 0.5, 0.75: most tokens leave after 2
    assert 1.0 <= float(m["halt_depth"]) <= 3.0 and float(m["halt_depth"]) != 3.0
    assert "exit_depth" not in m  # the gate's expected depth belongs to its own loss, not to halting


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("depth.halt_rule=nope",), "depth.halt_rule='nope' is not valid; choose one of never"),
        (("depth.halt_threshold=0.3",), "depth.halt_threshold=0.3 is set but depth.halt_rule is empty"),
        (("depth.halt_rule=steps",), "exit rule 'steps' has no default threshold; set depth.halt_threshold"),
        (("depth.halt_rule=gate", "depth.halt_threshold=0.5"), "reads the learned exit gate: it needs model.exit_gate"),
        (("depth.halt_rule=kl", "depth.halt_threshold=-1"), "depth.halt_threshold must be >= 0"),
        (("depth.halt_rule=kl", "depth.halt_kv=some"), "depth.halt_kv='some' is not valid; choose one of copy, full"),
        (("depth.halt_rule=kl", "model.guidance=linear"), "set model.guidance=none"),
        (("depth.halt_rule=kl", "model.exit_gate=true", "model.exit_entropy=0.05"), "set model.exit_entropy=0"),
        (
            ("depth.halt_rule=gate", "depth.halt_threshold=0.5", "model.exit_gate=true"),
            "reads a gate that only its own loss trains: set depth.halt_from > 0",
        ),
        (("depth.halt_rule=kl", "depth.bptt_k=1"), "depth.bptt_k=1 does not combine with depth.halt_rule"),
        (("depth.halt_kv=full",), "depth.halt_kv=full is set but depth.halt_rule is empty"),
        (("depth.halt_gate_loss=true",), "depth.halt_gate_loss=True is set but depth.halt_rule is empty"),
        (("depth.halt_rule=kl", "depth.halt_gate_loss=true"), "depth.halt_gate_loss trains the exit gate under"),
    ],
)
def test_bad_halting_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ init_from
def _train(cfg, workdir, **kw):
    return run(cfg, workdir, say=quiet, install_signal_handlers=False, compiler_options=FAST_COMPILE, **kw)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained gate run (5 steps, checkpoints at 3 and 5): the fine-tunes' source."""
    wd = tmp_path_factory.mktemp("src") / "run"
    cfg = tiny("model.exit_gate=true", "train.steps=5", "train.checkpoint_every=3", "train.eval_every=5")
    out = _train(cfg, wd)
    return wd, jax.tree.map(np.asarray, out["params"])


def finetune(*extra):
    return tiny("model.exit_gate=true", "depth.halt_rule=gate", "depth.halt_threshold=0.5", "train.seed=7", *extra)


def test_a_fine_tune_starts_from_the_source_parameters_and_pins_the_step(source, tmp_path):
    src, src_params = source
    cfg = finetune(f"train.init_from={src}", "train.steps=3", "train.warmup_steps=2", "train.eval_every=100")
    assert float(lr_schedule(cfg.train)(0)) == 0.0  # warmup: step 1's update is zero, so it shows the start
    out = _train(cfg, tmp_path / "ft", hooks=stop_at(1))
    for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(src_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    saved = config_from_yaml((tmp_path / "ft" / "config.yaml").read_text())
    assert saved.train.init_from == str(src / "checkpoints" / "5")  # the newest step, pinned


def test_a_killed_fine_tune_resumes_its_own_checkpoint_not_the_source(source, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    cfg = finetune(f"train.init_from={src}", "train.steps=5", "train.checkpoint_every=2", "train.eval_every=100")
    straight = _train(cfg, tmp_path / "straight")
    _train(cfg, tmp_path / "killed", hooks=stop_at(3))  # checkpoint at 2, step 3 lost
    # the source moves on (here: its pinned step is gone); the fine-tune's resume must not look at it
    shutil.rmtree(src / "checkpoints" / "5")
    resumed = _train(cfg, tmp_path / "killed")
    assert resumed["resumed_from"] == 2
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(straight["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = config_from_yaml((tmp_path / "killed" / "config.yaml").read_text())
    assert saved.train.init_from == str(src / "checkpoints" / "5")  # where its parameters came from


def test_init_from_a_named_step(source, tmp_path):
    src, _ = source
    cfg = finetune(f"train.init_from={src / 'checkpoints' / '3'}", "train.steps=1", "train.eval_every=100")
    _train(cfg, tmp_path / "ft")
    saved = config_from_yaml((tmp_path / "ft" / "config.yaml").read_text())
    assert saved.train.init_from == str(src / "checkpoints" / "3")


def test_gate_only_fine_tune_moves_the_gate_and_leaves_the_rest_bit_for_bit(source, tmp_path):
    # Ouro's stage II from the gate run: weight decay is on (0.1) and would move every decayed matrix
    # if the frozen parameters were only given zero gradients
    src, src_params = source
    cfg = tiny("model.exit_gate=true", f"train.init_from={src}", "train.trainable=exit_gate", "train.steps=3",
               "model.exit_gate_loss=improvement", "train.warmup_steps=0", "train.eval_every=3",
               "train.lr=1e-2")  # fmt: skip
    assert cfg.train.weight_decay > 0
    said = []
    out = run(cfg, tmp_path / "stage2", say=said.append, install_signal_handlers=False, compiler_options=FAST_COMPILE)
    gate = cfg.model.d_model + 1  # w [d] and b
    assert any(f"({gate} updated: train.trainable=exit_gate, the rest frozen)" in line for line in said), said
    flat = lambda p: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p)}
    got, want = flat(out["params"]), flat(src_params)
    gates = [k for k in want if k.startswith(("['w_gate']", "['b_gate']"))]
    assert len(gates) == 2 and all(np.abs(np.asarray(got[k]) - want[k]).max() > 0 for k in gates)
    for key, value in want.items():
        if key not in gates:
            np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    records = [r for r in _records(tmp_path / "stage2") if "train/objective" in r]
    assert records and all(r["train/grad_norm"] > 0 for r in records)


def test_bad_sources_are_refused_in_one_line_before_the_workdir_exists(source, tmp_path):
    src, _ = source
    cases = [
        (f"train.init_from={tmp_path / 'nothing'}", "has no readable checkpoint"),
        (f"train.init_from={src / 'checkpoints' / '4'}", "no step 4; the run has steps [3, 5]"),
    ]
    for override, message in cases:
        with pytest.raises(InitFromError) as e:
            _train(finetune(override), tmp_path / "ft")
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PreflightError) as e:  # train.py reports PreflightErrors in one line, exit 2
        _train(finetune(f"train.init_from={src}", "model.d_model=64"), tmp_path / "ft")
    assert "parameter ['blocks'][0]" in str(e.value) or "parameter ['embed']" in str(e.value)
    assert "the model's parameter shapes must match" in str(e.value)
    with pytest.raises(InitFromError, match="parameter \\['b_gate'\\] is"):
        _train(tiny(f"train.init_from={src}"), tmp_path / "ft")  # the source has a gate, this config none
    assert not (tmp_path / "ft").exists()


def _records(workdir):
    import json

    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_halt_from_trains_the_gate_first_then_under_halting_and_resumes_across_the_switch(tmp_path):
    # one run: steps 1-3 with the gate's own loss (exit_entropy in use), steps 4-7 under its exits; logs
    # every 2 steps plus at the switch (3), checkpoints at 5; killed after step 6, it resumes to the
    # straight run's parameters and metrics records
    from test_train_resume import records

    cfg = tiny(
        "model.exit_gate=true", "model.exit_entropy=0.05", "depth.halt_rule=gate", "depth.halt_threshold=0.6",
        "depth.halt_from=3", "train.steps=7", "train.log_every=2", "train.checkpoint_every=5", "train.eval_every=4",
    )  # fmt: skip
    straight = _train(cfg, tmp_path / "straight")
    train = {r["step"]: r for r in _records(tmp_path / "straight") if "train/ce" in r}
    assert sorted(train) == [2, 3, 4, 6, 7]  # 3: the switch is logged, so no record mixes the two losses
    for step, r in train.items():
        gate_loss = step <= 3
        assert ("train/exit_depth" in r) == gate_loss and ("train/halt_depth" in r) != gate_loss, step
    _train(cfg, tmp_path / "killed", hooks=stop_at(6))
    resumed = _train(cfg, tmp_path / "killed")
    assert resumed["resumed_from"] == 5
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(straight["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert records(tmp_path / "killed") == records(tmp_path / "straight")


def test_halt_from_must_fall_inside_the_run():
    with pytest.raises(ConfigError, match=r"depth.halt_from=10 must be in 0..train.steps-1=9"):
        tiny("depth.halt_rule=kl", "depth.halt_from=10", "train.steps=10")
    with pytest.raises(ConfigError, match=r"depth\.halt_from=3 is set but depth\.halt_rule is empty"):
        tiny("depth.halt_from=3")
    tiny("depth.halt_rule=kl", "depth.halt_from=3", "model.guidance=linear", "train.steps=10")  # guidance first: valid
