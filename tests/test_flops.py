"""Analytic parameter/FLOP counts against hand arithmetic; derived baselines; MFU table; CLI."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from asura.baselines import BaselineImpossible, iso_flop_depth, iso_flop_width, iso_param, report, token_matched
from asura.config import config_from_dict, load_config, with_overrides
from asura.flops import (
    depth_distribution,
    executed_flops,
    flop_count,
    forward_flops,
    khatri_rao_flops_per_step,
    main,
    param_count,
    train_flops,
)
from asura.mfu import mfu, peak_flops

VANILLA = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.iterations=1",
    "model.max_iterations=1",
    "model.injection=none",
    "model.iter_norm=false",
    "model.post_norm=false",
    "model.mlp=gelu",
    "model.norm=layernorm",
    "model.qk_norm=true",
    "model.tie_embeddings=true",
    "data.seq_len=32",
]

LOOPED = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.n_layers=1",
    "model.iterations=3",
    "model.max_iterations=3",
    "model.injection=projconcat",
    "model.iter_norm=true",
    "model.post_norm=true",
    "model.norm=rmsnorm",
    "model.qk_norm=true",
    "model.tie_embeddings=false",
    "model.adapter=abba",
    "model.adapter_rank=2",
    "model.adapter_rank2=3",
    "model.adapter_targets=[q, v, down]",
    "model.guidance=linear",
    "depth.bptt_k=2",
    "data.seq_len=16",
]


def test_vanilla_golden():
    cfg = load_config(None, VANILLA)
    pc = param_count(cfg)
    # V=256, d=64, 4 heads of 16, ff=4d=256, LayerNorm (scale+bias = 2 per channel), tied.
    embedding = 256 * 64  # 16384
    block = 2 * (2 * 64) + 4 * 64 * 64 + 2 * 64 * 256 + 2 * (2 * 16)  # pre-norms + qkvo + up/down + qk-norm = 49472
    assert block == 49472 and pc.block == block
    unique = embedding + 2 * block + 2 * 64  # + final LayerNorm = 115456
    assert pc.unique == pc.total == unique == 115456
    assert pc.head == 0 and pc.per_iteration == 0
    # FLOPs/token at T=32: dense 2·(qkvo + mlp weights) + causal attention 2·T·N·H, per block; head 2·d·V.
    per_block = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 32 * 4 * 16  # 98304 + 4096 = 102400
    fwd = 2 * per_block + 2 * 64 * 256  # 204800 + 32768 = 237568
    assert forward_flops(cfg, 1) == fwd == 237568
    assert train_flops(cfg, 1) == 3 * fwd == 712704
    fc = flop_count(cfg)
    assert fc.fwd == fwd and fc.train == 3 * fwd and fc.expected_depth == 1
    # Full (non-causal) attention doubles the score/AV term.
    assert forward_flops(cfg, 1, causal=False) == fwd + 2 * 2 * 32 * 64


def test_looped_golden():
    cfg = load_config(None, LOOPED)
    pc = param_count(cfg)
    # d=64, 4 query heads and 2 kv heads of H=16, RMSNorm (1 per channel), untied head.
    block = 2 * 64 + (64 * 64 + 2 * 64 * 32 + 64 * 64) + 2 * 64 * 256 + 2 * 16  # 128+12288+32768+32 = 45216
    assert pc.block == pc.stack == block == 45216
    proj = 2 * 64 * 64  # W_proj[t]: 2d -> d = 8192
    adapters = (2 + 3) * ((64 + 64) + (64 + 32) + (256 + 64))  # (r1+r2)(m+n) over q, v, down = 2720
    per_iter = proj + 64 + 64 + adapters  # + PostLN[t] + LN_t = 11040
    assert pc.per_iteration == per_iter == 11040
    assert (pc.projection, pc.post_norm, pc.iter_norm, pc.adapters) == (3 * 8192, 3 * 64, 3 * 64, 3 * 2720)
    outer = 256 * 64 + 64 * 256 + 64  # embedding + untied head + final norm = 32832
    assert pc.unique == outer + block + 3 * per_iter == 111168
    assert pc.total == outer + 3 * (block + per_iter) == 201600

    # FLOPs/token, T=16.
    dense = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 256)  # 90112
    abba = 2 * 2 * 3 * ((64 + 64) + (64 + 32) + (256 + 64))  # 2·r1·r2·(m+n) = 6528
    attn = 2 * 16 * 4 * 16  # causal 2·T·N·H = 2048
    iteration = 2 * 2 * 64 * 64 + dense + abba + attn  # ProjConcat 16384 + block 98688 = 115072
    head = 2 * 64 * 256  # 32768, applied every iteration (guidance)
    assert forward_flops(cfg, 3) == 3 * iteration + 3 * head == 443520
    # bptt_k=2 at n=3: iteration 1 forward only (2N), iterations 2-3 with gradients (6N); heads alike.
    train = 1 * iteration + 3 * 2 * iteration + (1 + 3 * 2) * head
    assert train_flops(cfg, 3) == train == 1034880
    assert flop_count(cfg).train == train
    # ABBA's per-step Khatri–Rao factor cost: r1·r2·(m+n) per adapted linear per iteration.
    assert khatri_rao_flops_per_step(cfg, 3) == 3 * 6 * 544


def test_executed_flops_under_halting():
    """Per-token halting: each token pays its own iterations and one head (a logit-reading exit rule,
    a head per iteration); hand-worked from the golden iteration and head counts above."""
    cfg = load_config(None, LOOPED)
    iteration, head = 115072, 2 * 64 * 256
    pmf = {1: 0.25, 2: 0.25, 3: 0.5}  # mean depth 2.25
    assert executed_flops(cfg, pmf) == pytest.approx(2.25 * iteration + head)
    assert executed_flops(cfg, pmf, rule_head=True) == pytest.approx(2.25 * (iteration + head))
    # every token at the full depth: a plain forward with one head (guidance off)
    plain = with_overrides(cfg, {"model.guidance": "none"})
    assert executed_flops(plain, {3: 1.0}) == forward_flops(plain, 3)


def test_depth_expectation_and_bptt():
    cfg = load_config(None, [*LOOPED, "model.max_iterations=4", "depth.schedule=uniform", "depth.min=1", "depth.max=4"])
    pmf = depth_distribution(cfg)
    assert sorted(pmf) == [1, 2, 3, 4] and sum(pmf.values()) == pytest.approx(1.0)
    fc = flop_count(cfg)
    assert fc.expected_depth == pytest.approx(2.5)
    assert fc.train == pytest.approx(sum(train_flops(cfg, n) / 4 for n in range(1, 5)))
    # bptt_k=0 means full backprop: exactly 3x forward.
    full = with_overrides(cfg, {"depth.bptt_k": 0})
    assert flop_count(full).train == pytest.approx(3 * flop_count(full).fwd)
    # A run shorter than bptt_k backprops through all of it.
    assert train_flops(cfg, 2) == 3 * forward_flops(cfg, 2)


def test_poisson_lognormal_uses_model_pmf():
    cfg = load_config(None, ["model.max_iterations=8", "model.iterations=3", "depth.schedule=poisson_lognormal"])
    pmf = depth_distribution(cfg)
    assert sum(pmf.values()) == pytest.approx(1.0) and max(pmf) == 8
    fc = flop_count(cfg)
    assert 2.5 < fc.expected_depth <= 3.0  # mean 3 before the mass above 8 is folded into 8
    assert fc.train == pytest.approx(sum(p * train_flops(cfg, n) for n, p in pmf.items()))


LOOPED_CASES = [
    ["model.d_model=256", "model.n_heads=4", "model.n_layers=4", "model.adapter=abba"],
    ["model.d_model=128", "model.n_layers=2", "model.mlp=swiglu", "model.adapter=lora", "model.guidance=uniform"],
    ["model.d_model=96", "model.n_heads=6", "model.n_layers=3", "model.injection=add", "model.max_iterations=4"],
    ["model.vocab_size=1024", "model.d_model=128", "model.tie_embeddings=false", "model.guidance=linear"],
    ["model.d_model=512", "model.n_heads=8", "model.n_layers=6", "data.seq_len=512", "model.adapter=abba"],
    [
        "model.n_layers=2",
        "model.injection=add",
        "model.loop_start=zero",
        "model.exit_gate=true",
        "model.exit_entropy=0.05",
    ],
]


@pytest.mark.parametrize("over", LOOPED_CASES)
def test_baselines_meet_tolerance(over):
    cfg = load_config(None, over)
    target_p, target_f = param_count(cfg).unique, flop_count(cfg).train
    for base in (iso_param(cfg), iso_flop_depth(cfg), token_matched(cfg)):
        m = base.model
        assert (m.iterations, m.max_iterations, m.injection, m.adapter, m.guidance) == (1, 1, "none", "none", "none")
        assert (m.qk_norm, m.norm, m.mlp, m.tie_embeddings, m.z_loss) == (
            cfg.model.qk_norm,
            cfg.model.norm,
            cfg.model.mlp,
            cfg.model.tie_embeddings,
            cfg.model.z_loss,
        )
    assert abs(param_count(iso_param(cfg)).unique / target_p - 1) <= 0.01
    assert iso_flop_depth(cfg).model.n_layers == cfg.model.n_layers * 3
    tm = token_matched(cfg)
    assert tm.model.n_layers == cfg.model.n_layers and tm.train.steps == 3 * cfg.train.steps
    try:
        w = iso_flop_width(cfg)
    except BaselineImpossible as e:
        assert "iso_flop_width" in str(e)
    else:
        assert (
            abs(flop_count(w).train / target_f - 1) <= 0.01
        )  # built to the labelling tolerance (asura.baselines.TOLERANCES)
        assert w.model.n_layers == cfg.model.n_layers and w.model.d_model % (8 * cfg.model.n_heads) == 0


def test_iso_flop_width_solved_at_scale():
    cfg = load_config(ROOT / "configs/presets/looped_350m.yaml")
    w = iso_flop_width(cfg)
    assert (
        abs(flop_count(w).train / flop_count(cfg).train - 1) <= 0.01
    )  # built to the labelling tolerance (asura.baselines.TOLERANCES)
    assert w.model.d_model % 128 == 0 and w.model.n_layers == 13


def test_iso_param_falls_back_to_d_ff():
    # One looped layer whose per-iteration extras are ~half a block: no integer depth is within 1%.
    cfg = load_config(None, ["model.n_layers=1", "model.max_iterations=4", "model.adapter=abba"])
    base = iso_param(cfg)
    assert base.model.d_ff % 8 == 0 and base.model.d_ff != 4 * base.model.d_model
    assert abs(param_count(base).trained / param_count(cfg).trained - 1) <= 0.01
    assert param_count(cfg).untrained > 0 and param_count(base).untrained == 0  # the 4th slot: depth 3 never uses it


def test_impossible_is_clear(capsys):
    # A tiny width with a large vocabulary: the unembedding dominates, and the smallest head-compatible
    # width (64 = 8 heads x 8) already overshoots the looped model's FLOPs by far more than 1%.
    over = ["model.d_model=32", "model.n_heads=8", "model.vocab_size=4096"]
    cfg = load_config(None, over)
    with pytest.raises(BaselineImpossible, match=r"no width in multiples of 64 .* within 1%"):
        iso_flop_width(cfg)
    rep = report(cfg)
    assert set(rep["iso_flop_width"]) == {"impossible"}
    main(["--config", str(ROOT / "configs/base.yaml"), *over])
    assert "impossible: iso_flop_width" in capsys.readouterr().out


def test_width_baseline_is_built_to_the_labelling_tolerance():
    # Built and labelled with one tolerance: a width baseline that exists is iso-FLOP within 1%.
    from asura.baselines import TOLERANCES

    for name in ("demo", "presets/looped_350m", "presets/looped_tiny"):
        cfg = load_config(ROOT / f"configs/{name}.yaml")
        base = iso_flop_width(cfg)
        assert abs(flop_count(base).train / flop_count(cfg).train - 1) <= TOLERANCES["iso-FLOP"], name


def test_inexact_depth_is_reported():
    cfg = load_config(ROOT / "configs/presets/looped_tiny.yaml")
    assert flop_count(cfg).expected_depth == pytest.approx(2.5)
    assert iso_flop_depth(cfg).model.n_layers == 2 * 3  # 2.5 rounds half up
    assert "inexact" in report(cfg)["iso_flop_depth"]["check"]


ENTRY_KEYS = ("params_unique", "params_total", "flops_per_token_fwd", "flops_per_token_train", "config")


def test_cli_json(capsys):
    main(["--config", str(ROOT / "configs/demo.yaml"), "--json"])
    out = json.loads(capsys.readouterr().out)
    kinds = {"iso_param", "iso_flop_depth", "iso_flop_depth_steps", "iso_flop_width", "token_matched"}
    assert set(out) == {"model", *kinds}
    for entry in out.values():
        if "impossible" not in entry:
            assert set(ENTRY_KEYS) <= set(entry)
            config_from_dict(entry["config"])  # a complete config that validates
    cfg = load_config(ROOT / "configs/demo.yaml")
    assert out["model"]["params_unique"] == param_count(cfg).unique


def test_presets_load():
    for name in ("looped_350m", "looped_tiny", "vanilla_350m"):
        cfg = load_config(ROOT / f"configs/presets/{name}.yaml")
        assert cfg.name == name
    big = load_config(ROOT / "configs/presets/looped_350m.yaml")
    assert (big.model.n_layers, big.model.d_model, big.model.iterations) == (13, 1024, 3)
    assert big.model.guidance_weights == (0.2, 0.3, 0.5) and big.model.adapter == "abba"


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
    ],
)
def test_peak_table(kind, peak):
    assert peak_flops(kind) == peak
    assert mfu(peak / 2, kind) == pytest.approx(0.5)


def test_unknown_device_is_none():
    assert peak_flops("cpu") is None and mfu(1e12, "cpu") is None
    assert mfu(1e12, "NVIDIA GeForce RTX 4090") is None
