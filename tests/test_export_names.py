"""asura.io.names: every parameter of every model variant has a stable name, per-iteration stacks
unstack along the axis the model itself calls "iteration", matrices land in torch's [out, in]
layout, a vanilla config's names are Llama's, and the round trip is bit-exact. numpy only."""

import ml_dtypes
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from asura.compat import variable_axes
from asura.config.schema import ModelConfig
from asura.io.export import flat_params
from asura.io.names import NameTableError, entry, from_hf, to_hf

V = 32
BASE = dict(vocab_size=V, d_model=32, n_heads=2, n_layers=2, iterations=3, max_iterations=3)
VARIANTS = {
    "abba_layernorm_projconcat": ModelConfig(
        **BASE, adapter="abba", adapter_rank=2, adapter_rank2=3, adapter_targets=("q", "v", "o", "down"),
    ),
    "lora_swiglu_gqa_untied_gate": ModelConfig(
        **{**BASE, "n_heads": 4}, n_kv_heads=2, adapter="lora", adapter_rank=3, mlp="swiglu", norm="rmsnorm",
        adapter_targets=("q", "k", "v", "o", "up", "gate", "down"), tie_embeddings=False, exit_gate=True,
        injection="add", qk_norm=False,
    ),
    "vanilla": ModelConfig(
        **{**BASE, "iterations": 1, "max_iterations": 1}, injection="none", iter_norm=False, post_norm=False,
        mlp="swiglu", norm="rmsnorm", qk_norm=False,
    ),
}  # fmt: skip


def like(params: dict) -> dict:
    return {k: (v.shape, v.dtype) for k, v in params.items()}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    cfg = VARIANTS[request.param]
    model = random_model(cfg, seed=3)
    return request.param, cfg, model, flat_params(model)


def test_per_iteration_is_the_models_iteration_axis(variant):
    """The table unstacks exactly the parameters whose first logical axis is "iteration" (the model's
    own annotation), so a new per-iteration parameter cannot be exported as one stacked tensor."""
    _, _, model, _ = variant
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable_axes(var) or ()
        assert entry(tuple(path)).per_iteration == (axes[:1] == ("iteration",)), path


def test_values_land_in_torch_layout(variant):
    _, cfg, _, params = variant
    hf = to_hf(params)
    M, D = cfg.max_iterations, cfg.d_model
    # one tensor per (parameter, iteration) for stacks, one per parameter otherwise
    expected = sum(v.shape[0] if entry(k).per_iteration else 1 for k, v in params.items())
    assert len(hf) == expected
    np.testing.assert_array_equal(hf["model.embed_tokens.weight"], params[("embed",)])
    np.testing.assert_array_equal(
        hf["model.layers.1.self_attn.q_proj.weight"], params[("blocks", 1, "attn", "q", "kernel")].T
    )
    np.testing.assert_array_equal(
        hf["model.layers.0.mlp.down_proj.weight"], params[("blocks", 0, "mlp", "down", "kernel")].T
    )
    np.testing.assert_array_equal(hf["model.norm.weight"], params[("final_norm", "scale")])
    assert hf["model.layers.0.mlp.down_proj.weight"].shape == (D, cfg.ff_dim)
    if cfg.injection == "projconcat":
        for t in range(M):
            np.testing.assert_array_equal(hf[f"model.inject.{t}.weight"], params[("w_proj",)][t].T)
            np.testing.assert_array_equal(hf[f"model.iter_norm.{t}.bias"], params[("iter_norm", "bias")][t])
            np.testing.assert_array_equal(hf[f"model.post_norm.{t}.weight"], params[("post_norm", "scale")][t])
    if cfg.adapter == "abba":
        p = ("blocks", 1, "attn", "v", "adapter")
        for t in range(M):
            pre = f"model.layers.1.self_attn.v_proj.adapters.{t}"
            for f, n in (("u1", "A1"), ("u2", "A2"), ("v1", "B1"), ("v2", "B2")):
                np.testing.assert_array_equal(hf[f"{pre}.{n}.weight"], params[(*p, f)][t].T)
    if cfg.adapter == "lora":
        pre, p = "model.layers.0.mlp.gate_proj.adapters.2", ("blocks", 0, "mlp", "gate", "adapter")
        np.testing.assert_array_equal(hf[f"{pre}.lora_A.weight"], params[(*p, "u")][2].T)
        np.testing.assert_array_equal(hf[f"{pre}.lora_B.weight"], params[(*p, "v")][2].T)
    if not cfg.tie_embeddings:
        np.testing.assert_array_equal(hf["lm_head.weight"], params[("unembed",)].T)
    if cfg.exit_gate:
        np.testing.assert_array_equal(hf["model.exit_gate.weight"], params[("w_gate",)][None, :])
        np.testing.assert_array_equal(hf["model.exit_gate.bias"], params[("b_gate",)])
    assert all(x.flags["C_CONTIGUOUS"] for x in hf.values())  # safetensors writes the buffer as it is


def test_round_trip_is_bit_exact(variant):
    _, _, _, params = variant
    back = from_hf(to_hf(params), like(params))
    assert back.keys() == params.keys()
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes(), k


def test_round_trip_bfloat16():
    params = {
        k: v.astype(ml_dtypes.bfloat16) for k, v in flat_params(random_model(VARIANTS["vanilla"], seed=4)).items()
    }
    back = from_hf(to_hf(params), like(params))
    assert all(back[k].dtype == ml_dtypes.bfloat16 and back[k].tobytes() == v.tobytes() for k, v in params.items())


def test_vanilla_names_are_llamas():
    """A vanilla config's tensors are named as transformers' Llama names its own (tied embeddings: no lm_head)."""
    cfg = VARIANTS["vanilla"]
    names = set(to_hf(flat_params(random_model(cfg, seed=5))))
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
        "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ]  # fmt: skip
    llama = {"model.embed_tokens.weight", "model.norm.weight"}
    llama |= {f"model.layers.{i}.{n}" for i in range(cfg.n_layers) for n in per_layer}
    assert names == llama


def test_bad_tensors_are_one_line_errors():
    params = flat_params(random_model(VARIANTS["abba_layernorm_projconcat"], seed=6))
    hf = to_hf(params)
    cases = {
        "is missing": {k: v for k, v in hf.items() if k != "model.inject.2.weight"},
        "belongs to no parameter": {**hf, "model.layers.9.mlp.up_proj.weight": hf["model.layers.0.mlp.up_proj.weight"]},
        "has shape": {
            **hf,
            "model.layers.0.self_attn.q_proj.weight": hf["model.layers.0.self_attn.q_proj.weight"][:, :8],
        },
        "is float64": {**hf, "model.norm.weight": hf["model.norm.weight"].astype(np.float64)},
    }
    for match, tensors in cases.items():
        with pytest.raises(NameTableError, match=match) as e:
            from_hf(tensors, like(params))
        assert "\n" not in str(e.value)
    # a square matrix stored untransposed has the right shape: only the values can tell (layout test above)
    with pytest.raises(NameTableError, match="has no stable name"):
        entry(("blocks", 0, "attn", "q", "lora_magic"))
    with pytest.raises(NameTableError, match="module 'router'"):
        entry(("blocks", 0, "router", "kernel"))
