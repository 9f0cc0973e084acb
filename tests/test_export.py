"""`python -m asura.export` on a run written by train.py, without torch: the safetensors read back
with numpy equal the checkpoint's parameters, config.json states every forward flag, the tokenizer
is asura's byte tokenizer, import back into asura is bit-exact, and every bad request is one line
and exit 2 with nothing written. (The PyTorch side: tests/test_export_torch.py.)"""

import json
import os
import re
import stat

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, random_model, tiny_config, train_demo
from flax import nnx
from safetensors.numpy import load_file

from asura import export as export_cli
from asura.config import config_from_yaml, config_to_yaml
from asura.io.export import ExportError, byte_chars, export_model, flat_params, hf_config, load_export
from asura.io.load import load

PROG = "python -m asura.export"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return train_demo(tmp_path_factory.mktemp("export") / "demo")


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = export_cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(argv, capsys, match: str) -> None:
    rc, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and match in lines[0] and not out, (rc, err)
    assert lines[0].startswith(f"{PROG}: error: ")


def test_export_reads_back_with_numpy(demo, tmp_path, capsys):
    out = tmp_path / "exp"
    rc, stdout, err = run(["--workdir", demo, "--out", out], capsys)
    assert rc == 0, err
    assert "AsuraForCausalLM from step 2" in stdout and "trust_remote_code=True" in stdout
    files = {p.name for p in out.iterdir()}
    assert files == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "configuration_asura.py", "modeling_asura.py", "README.md"}  # fmt: skip
    loaded = load(demo)
    params = flat_params(loaded.model)
    tensors = load_file(str(out / "model.safetensors"))
    m = loaded.cfg.model
    # read by name, by hand (not through the table): the layout a PyTorch reader sees
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], params[("embed",)])
    for t in range(m.max_iterations):
        np.testing.assert_array_equal(tensors[f"model.inject.{t}.weight"], params[("w_proj",)][t].T)
        np.testing.assert_array_equal(tensors[f"model.iter_norm.{t}.weight"], params[("iter_norm", "scale")][t])
    for name, leaf in (("q_proj", "q"), ("o_proj", "o")):
        np.testing.assert_array_equal(tensors[f"model.layers.0.self_attn.{name}.weight"],
                                      params[("blocks", 0, "attn", leaf, "kernel")].T)  # fmt: skip
    np.testing.assert_array_equal(
        tensors["model.layers.0.mlp.up_proj.weight"], params[("blocks", 0, "mlp", "up", "kernel")].T
    )
    assert sum(v.size for v in tensors.values()) == sum(v.size for v in params.values())

    config = json.loads((out / "config.json").read_text())
    expect = {"hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "depth": m.iterations,
              "max_iterations": m.max_iterations, "injection": m.injection, "norm": m.norm, "mlp": m.mlp,
              "qk_norm": m.qk_norm, "iter_norm": m.iter_norm, "post_norm": m.post_norm, "extrapolation": "none",
              "tie_word_embeddings": m.tie_embeddings, "max_position_embeddings": loaded.cfg.data.seq_len,
              "asura_step": 2, "asura_config": config_to_yaml(loaded.cfg), "model_type": "asura"}  # fmt: skip
    assert {k: config[k] for k in expect} == expect
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_asura.AsuraForCausalLM"
    assert (out / "modeling_asura.py").read_bytes() == (ROOT / "asura/io/hf/modeling_asura.py").read_bytes()


def test_tokenizer_is_asuras_byte_tokenizer(demo, tmp_path, capsys):
    """Every byte value is its own id, both ways (the ByteLevel alphabet in byte order)."""
    from tokenizers import Tokenizer

    assert len(set(byte_chars())) == 256
    out = tmp_path / "exp"
    assert run(["--workdir", demo, "--out", out], capsys)[0] == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 256
    text = "12+34=\n héllo\t€ \x00\x7f"
    assert tok.encode(text).ids == list(text.encode("utf-8"))
    assert [tok.encode(bytes([b]).decode("latin-1").encode("latin-1").decode("utf-8", "ignore")).ids
            for b in range(0x20, 0x7f)] == [[b] for b in range(0x20, 0x7f)]  # fmt: skip
    assert tok.decode(list(text.encode("utf-8"))) == text


def test_import_back_is_bit_exact(demo, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run(["--workdir", demo, "--out", out, "--step", "2"], capsys)[0] == 0
    back, orig = load_export(out), load(demo, 2)
    assert back.step == 2 and config_to_yaml(back.cfg) == config_to_yaml(orig.cfg)
    a, b = nnx.to_flat_state(nnx.state(orig.model, nnx.Param)), nnx.to_flat_state(nnx.state(back.model, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, va), (_, vb) in zip(a, b, strict=True):
        assert np.asarray(va[...]).tobytes() == np.asarray(vb[...]).tobytes(), p
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    for n in range(1, orig.cfg.model.max_iterations + 1):
        assert np.asarray(orig.model(tok, n)).tobytes() == np.asarray(back.model(tok, n)).tobytes()


def test_stock_export_of_a_vanilla_config(tmp_path):
    """A vanilla RMSNorm + SwiGLU + RoPE config exports as Llama (Qwen3 with QK-norm), Llama's names and
    config keys, and imports back bit-exact; a looped config is refused naming its flag."""
    vanilla = ("model.iterations=1", "model.max_iterations=1", "model.injection=none", "model.iter_norm=false",
               "model.post_norm=false", "model.mlp=swiglu", "model.norm=rmsnorm", "model.guidance=none")  # fmt: skip
    for qk, arch in (("false", "LlamaForCausalLM"), ("true", "Qwen3ForCausalLM")):
        cfg = tiny_config(*vanilla, f"model.qk_norm={qk}")
        model = random_model(cfg.model, seed=1)
        done = export_model(model, cfg, tmp_path / qk, fmt="stock", step=5)
        config = json.loads((tmp_path / qk / "config.json").read_text())
        assert done.architecture == arch == config["architectures"][0]
        assert config["rms_norm_eps"] == cfg.model.norm_eps and config["hidden_act"] == "silu"
        assert "auto_map" not in config and not (tmp_path / qk / "modeling_asura.py").exists()
        names = set(load_file(str(tmp_path / qk / "model.safetensors")))
        assert ("model.layers.0.self_attn.q_norm.weight" in names) == (qk == "true")
        back = load_export(tmp_path / qk)
        tok = jnp.arange(12)[None] % cfg.model.vocab_size
        assert np.asarray(back.model(tok, 1)).tobytes() == np.asarray(model(tok, 1)).tobytes()
    looped = tiny_config("model.mlp=swiglu", "model.norm=rmsnorm")
    with pytest.raises(ExportError, match=r"--format stock: model\.iterations=2: a stock model runs each layer once"):
        export_model(random_model(looped.model), looped, tmp_path / "looped", fmt="stock")
    gelu = tiny_config(*vanilla[:5], "model.guidance=none")
    with pytest.raises(ExportError, match=r"model\.mlp=gelu: Llama/Qwen3 MLPs are SwiGLU"):
        export_model(random_model(gelu.model), gelu, tmp_path / "gelu", fmt="stock")
    bf16 = tiny_config(*vanilla, "model.dtype=bfloat16")
    with pytest.raises(ExportError, match=r"model\.dtype=bfloat16 with param_dtype=float32: a stock model computes in"):
        export_model(random_model(bf16.model), bf16, tmp_path / "bf16", fmt="stock")
    assert not any((tmp_path / n).exists() for n in ("looped", "gelu", "bf16"))
    # one iteration of a run with more slots but no per-iteration parameter is still exactly Qwen3 (QK-norm)
    slots = tiny_config(*vanilla[:1], "model.max_iterations=2", *vanilla[2:])
    done = export_model(random_model(slots.model, seed=2), slots, tmp_path / "slots", fmt="stock")
    config = json.loads((tmp_path / "slots" / "config.json").read_text())
    assert done.architecture == "Qwen3ForCausalLM" and config["eos_token_id"] is None  # no special tokens
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_refusals_are_one_line_and_write_nothing(demo, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    refused(["--workdir", demo, "--out", full], capsys, "exists and is not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(["--workdir", demo, "--out", a_file], capsys, "exists and is not a directory")
    refused(["--workdir", demo, "--out", "gs://bucket/exp"], capsys, "is not a local directory")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    refused(["--workdir", empty, "--out", tmp_path / "o1"], capsys, "has no checkpoints")
    refused(["--workdir", tmp_path / "nowhere", "--out", tmp_path / "o2"], capsys, "does not exist")
    refused(["--workdir", demo, "--out", tmp_path / "o3", "--step", "7"], capsys, "step 7 not found")
    refused(["--workdir", demo, "--out", tmp_path / "o4", "--step", "x"], capsys, "--step must be an integer")
    refused(["--workdir", demo, "--out", tmp_path / "o5", "--format", "onnx"], capsys, "invalid choice: 'onnx'")
    refused(["--workdir", demo, "--out", tmp_path / "o6", "--format", "stock"], capsys,
            "--format stock: model.iterations=3: a stock model runs each layer once")  # fmt: skip
    refused(["--workdir", demo], capsys, "the following arguments are required: --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "file", "full"]
    # an empty directory is a valid target
    empty_out = tmp_path / "empty_out"
    empty_out.mkdir()
    assert run(["--workdir", demo, "--out", empty_out], capsys)[0] == 0
    assert (empty_out / "model.safetensors").is_file()


def test_load_export_refuses_what_it_cannot_read(demo, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run(["--workdir", demo, "--out", out], capsys)[0] == 0
    with pytest.raises(ExportError, match=r"has no config\.json"):
        load_export(tmp_path)
    (out / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ExportError, match=r"has no model\.safetensors"):
        load_export(out)
    (tmp_path / "moved.safetensors").rename(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "asura_config": ""}))
    with pytest.raises(ExportError, match="has no asura_config"):
        load_export(out)
    other = config_to_yaml(load(demo).cfg).replace("d_model: 64", "d_model: 32")
    # a consistent config.json for another width: the weights no longer fit it
    (out / "config.json").write_text(json.dumps(hf_config(config_from_yaml(other), "asura", 2)))
    want = (
        "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape [64, 64], the model needs [32, 32]"
    )
    with pytest.raises(ExportError, match=re.escape(want)):
        load_export(out)


def test_load_export_refuses_an_edited_config(demo, tmp_path, capsys):
    """PyTorch reads config.json's keys, asura its asura_config: an edit to one side is refused, naming the key."""
    out = tmp_path / "exp"
    assert run(["--workdir", demo, "--out", out], capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    for key, value in (("norm_eps", 1e-3), ("depth", 2), ("rope_theta", 50.0), ("adapter", "lora")):
        (out / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ExportError, match=rf"config\.json: {key}={value!r} disagrees with asura_config"):
            load_export(out)
    edited = config["asura_config"].replace("rope_theta: 10000.0", "rope_theta: 50.0")
    assert edited != config["asura_config"]
    (out / "config.json").write_text(json.dumps({**config, "asura_config": edited}))
    with pytest.raises(ExportError, match=r"rope_theta=10000\.0 disagrees with asura_config \(50\.0\)"):
        load_export(out)
    (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "asura_step": 9}))
    assert load_export(out).step == 9  # the load dtype and provenance are not the model


def test_out_paths(demo, tmp_path, capsys, monkeypatch):
    """The current directory (empty), group/world-readable files under the umask, and one-line refusals for
    an out whose parent is a file or that lies inside the run."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    old = os.umask(0o022)
    try:
        rc, stdout, err = run(["--workdir", demo, "--out", "."], capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stdout.startswith(f"{here}: AsuraForCausalLM from step 2")  # the resolved directory, not "."
    assert (here / "model.safetensors").is_file() and not [p for p in here.iterdir() if p.name.startswith(".")]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in here.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    refused(["--workdir", demo, "--out", tmp_path / "a_file" / "exp"], capsys, "cannot write --out")
    refused(["--workdir", demo, "--out", demo / "exports"], capsys, "is inside the run's workdir")
    refused(["--workdir", demo / "checkpoints" / "2", "--out", demo / "x"], capsys, "is inside the run's workdir")
    assert not (demo / "exports").exists() and not (demo / "x").exists()
