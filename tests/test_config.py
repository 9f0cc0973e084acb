"""Config system: typing, overrides, `extends`, validation and YAML round-trip."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from asura.config import (
    Config,
    ConfigError,
    config_from_yaml,
    config_to_yaml,
    load_config,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_demo_loads_and_extends_base():
    cfg = load_config(DEMO)
    assert cfg.name == "demo"
    # From base.yaml, not restated in demo.yaml.
    assert cfg.model.injection == "projconcat"
    assert cfg.model.qk_norm is True and cfg.train.seed == 0


def test_overrides_coerce_types():
    cfg = load_config(
        DEMO,
        [
            "model.d_model=96",
            "model.qk_norm=false",
            "train.lr=1e-3",
            "model.adapter_targets=[q,v]",
            "train.eval_depths=1,2",
            "model.z_loss=0",
        ],
    )
    assert cfg.model.d_model == 96 and isinstance(cfg.model.d_model, int)
    assert cfg.model.qk_norm is False
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.adapter_targets == ("q", "v")
    assert cfg.train.eval_depths == (1, 2)
    assert cfg.model.z_loss == 0.0 and isinstance(cfg.model.z_loss, float)


@pytest.mark.parametrize(
    "name",
    sorted(
        p.relative_to(ROOT / "configs").as_posix()
        for p in ROOT.glob("configs/**/*.yaml")
        if "sweeps" not in p.parts and "studies" not in p.parts  # sweep specs and study plans are not train configs
    ),
)
def test_yaml_round_trip_is_exact(name):
    path = ROOT / "configs" / name
    cfg = load_config(path)
    text = config_to_yaml(cfg)
    again = config_from_yaml(text)
    assert again == cfg
    assert config_to_yaml(again) == text


def test_round_trip_non_default_values():
    cfg = load_config(
        DEMO,
        [
            "model.adapter=abba",
            "model.guidance=explicit",
            "model.max_iterations=3",
            "model.iterations=3",
            "model.guidance_weights=[0.2,0.3,0.5]",
            "mesh.rules.embed=[fsdp,tensor]",
            "depth.schedule=poisson_lognormal",
        ],
    )
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_with_overrides_dict_and_list():
    cfg = load_config(DEMO)
    a = with_overrides(cfg, {"model.n_layers": 4, "train.steps": 7})
    b = with_overrides(cfg, ["model.n_layers=4", "train.steps=7"])
    assert a == b and a.model.n_layers == 4 and a.train.steps == 7
    assert cfg.model.n_layers != 4 or cfg.train.steps != 7  # original untouched


def test_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.model.d_model = 3  # type: ignore[misc]


def test_extends_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nmodel:\n  d_model: 64\n")
    (tmp_path / "b.yaml").write_text(f"extends: {DEMO}\nmodel:\n  n_layers: 3\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.name) == (64, 3, "demo")
    (tmp_path / "c.yaml").write_text("extends: d.yaml\n")
    (tmp_path / "d.yaml").write_text("extends: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")


BAD_INPUTS = [
    (["model.not_a_key=1"], "not_a_key"),
    (["model.d_modle=64"], "d_model"),  # typo: suggestion names the closest key
    (["nosection.x=1"], "nosection"),
    (["model.d_model=abc"], "model.d_model must be an integer"),
    (["model.d_model=1.5"], "model.d_model must be an integer"),
    (["model.qk_norm=maybe"], "model.qk_norm must be true or false"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["model.n_heads=5"], "must divide model.d_model"),
    (["model.iterations=9"], "extrapolation"),
    (["model.injection=concat"], "choose one of projconcat, add, none"),
    (["model.remat=full"], "none, block, iteration, sqrt"),
    (["model.vocab_size=0"], "model.vocab_size must be > 0"),
    (["train.batch_size=30", "train.grad_accum=4"], "grad_accum"),
    (["model.guidance=explicit", "model.guidance_weights=[0.5,0.5]"], "guidance_weights"),
    (["model.guidance=explicit", "model.guidance_weights=[0.5,0.3,0.1,0.1]"], "non-decreasing"),
    (["model.adapter_targets=[q,zz]"], "zz"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "only one mesh axis"),
    (["mesh.rules.embed=[gpu]"], "unknown mesh axis"),
    (["data.source=text"], "data.path"),
    (["depth.max=9"], "depth.max"),
    (["train.eval_depths=[0]"], "eval_depths"),
    (["model.n_kv_heads=3"], "n_kv_heads"),
    (["model.ce_chunk=7"], "ce_chunk"),
    (["badformat"], "section.key=value"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_INPUTS)
def test_bad_inputs_raise_one_line(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model.not_a_key=1"], "not_a_key"),
        (["model.d_model=abc"], "must be an integer"),
        (["model.n_heads=5"], "must divide"),
    ],
)
def test_train_cli_exits_2_fast(args, needle):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(DEMO), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 15, f"config errors must come before JAX work, took {elapsed:.1f}s"
