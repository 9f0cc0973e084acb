"""The exported model in PyTorch (transformers, trust_remote_code) against asura: logits at every
depth and extrapolation mode for configs with every trick on, greedy tokens equal to
`python -m asura.generate` at depths 1-6 for the demo run and an every-trick run, and stock
Llama/Qwen3 exports against transformers' own classes. Needs the `hf` extra (torch, transformers):
skipped without it; tests/test_export.py checks the files with numpy everywhere."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model, tiny_config, train_demo
from flax import nnx

torch = pytest.importorskip("torch", reason="the PyTorch parity tests need the hf extra: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the parity tests need the hf extra: pip install -e '.[hf]'")

from test_export import run as run_export  # noqa: E402

from asura import generate as generate_cli  # noqa: E402
from asura.data.tokenizer import ByteTokenizer  # noqa: E402
from asura.infer.cli import show  # noqa: E402
from asura.io.export import export_model  # noqa: E402
from asura.io.load import model_from_params, with_extrapolation  # noqa: E402

# fp32 against fp32 from another library (XLA vs torch: other matmul blocking, rsqrt, pow, softmax): rounding
# u = 2^-24 per op, ~10^2 ops in series per iteration, up to 6 iterations (norms rescale between them), on
# logits of magnitude ~5: ~1e-5 at worst. A wrong slot, transpose or missing adapter moves logits by O(1).
TOL = dict(rtol=5e-5, atol=5e-5)
EVERY_TRICK = (  # ProjConcat, per-iteration norms, ABBA, latent guidance, QK-norm, z-loss (the gate: below)
    "model.injection=projconcat", "model.iter_norm=true", "model.post_norm=true", "model.adapter=abba",
    "model.adapter_rank=2", "model.adapter_rank2=2", "model.guidance=linear", "model.qk_norm=true",
    "model.z_loss=1e-3",
)  # fmt: skip
VARIANTS = {
    "every_trick": (*EVERY_TRICK, "model.iterations=3", "model.max_iterations=3", "model.n_layers=2"),
    "lora_swiglu_gqa_untied_rms_add_zero_gate": (
        "model.adapter=lora", "model.adapter_rank=3", "model.adapter_targets=[q,k,v,o,up,gate,down]",
        "model.mlp=swiglu", "model.norm=rmsnorm", "model.n_heads=4", "model.n_kv_heads=2",
        "model.tie_embeddings=false", "model.injection=add", "model.loop_start=zero", "model.qk_norm=false",
        "model.iterations=3", "model.max_iterations=3", "model.exit_gate=true",  # the gate excludes guidance
    ),
    "nope_none_injection": ("model.position=none", "model.injection=none", "model.post_norm=false"),
}  # fmt: skip


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def cache_of(out):
    """The output's cache: field `cache` (transformers >= 5.2x) or `past_key_values` (before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def logits(hf, tok, **kw):
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tok)), **kw).logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    cfg = tiny_config(*VARIANTS[request.param])
    model = random_model(cfg.model, seed=11)
    out = tmp_path_factory.mktemp("torch") / request.param
    export_model(model, cfg, out, step=3)
    return cfg, model, hf_load(out)


def test_logits_match_at_every_depth(exported):
    cfg, model, hf = exported
    M = cfg.model.max_iterations
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tok = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 20))
    for n in range(1, M + 1):
        np.testing.assert_allclose(logits(hf, tok, depth=n), np.asarray(model(jnp.asarray(tok), n)), **TOL)
    for mode in ("last", "cycle"):  # depths past max_iterations, as asura extrapolates them
        ref = model_from_params(with_extrapolation(cfg, mode), params)
        for n in range(M + 1, 7):
            np.testing.assert_allclose(
                logits(hf, tok, depth=n, extrapolation=mode), np.asarray(ref(jnp.asarray(tok), n)), **TOL
            )
    assert hf.config.depth == cfg.model.iterations
    np.testing.assert_allclose(logits(hf, tok), np.asarray(model(jnp.asarray(tok))), **TOL)  # default depth


def test_left_padding_and_cache_agree(exported):
    """A left-padded row gives its unpadded logits, and greedy decoding with the per-(iteration, layer)
    KV cache gives the tokens of recomputing the whole prefix."""
    cfg, _, hf = exported
    tok = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (1, 9))
    padded = np.concatenate([np.zeros((1, 4), np.int64), tok], axis=1)
    mask = np.concatenate([np.zeros((1, 4), np.int64), np.ones((1, 9), np.int64)], axis=1)
    with torch.no_grad():
        got = hf(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask), depth=2).logits.numpy()[:, 4:]
    np.testing.assert_allclose(got, logits(hf, tok, depth=2), **TOL)
    ids = torch.as_tensor(tok[:, :5])
    lengths = []  # tokens per forward call: with the cache, the prompt once and then one new token per step
    hook = hf.model.embed_tokens.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    try:
        for n in (1, 2, 5):
            kw = dict(depth=n, extrapolation="cycle", max_new_tokens=7, do_sample=False)
            lengths.clear()
            cached = hf.generate(ids, **kw).tolist()
            assert lengths == [5] + [1] * 6, lengths  # the cache was really carried from step to step
            assert cached == hf.generate(ids, use_cache=False, **kw).tolist()
    finally:
        hook.remove()


def test_exit_gate_and_refusals(tmp_path):
    cfg = tiny_config(*VARIANTS["lora_swiglu_gqa_untied_rms_add_zero_gate"])
    model = random_model(cfg.model, seed=12)
    export_model(model, cfg, tmp_path / "e", step=0)
    hf = hf_load(tmp_path / "e")
    tok = np.arange(10)[None] % cfg.model.vocab_size
    with torch.no_grad():
        normed, _ = hf.model(
            torch.as_tensor(tok), torch.arange(10)[None], torch.ones(1, 1, 10, 10, dtype=bool).tril(), depth=2
        )
        lam = hf.exit_prob(normed).numpy()
    h = model.run_loop(jnp.asarray(tok), 2).h_BTD
    np.testing.assert_allclose(lam, np.asarray(model.exit_prob(h)), **TOL)
    with pytest.raises(ValueError, match="depth 4 is past max_iterations=3: pass extrapolation='last' or 'cycle'"):
        hf(torch.as_tensor(tok), depth=4)
    with pytest.raises(ValueError, match="extrapolation='sideways' is not valid"):
        hf(torch.as_tensor(tok), depth=2, extrapolation="sideways")
    out = hf(torch.as_tensor(tok), depth=2, use_cache=True)
    with pytest.raises(
        ValueError, match=r"this cache was filled at depth 2, extrapolation 'none'; a cache serves one depth"
    ):
        hf(torch.as_tensor(tok[:, :1]), depth=3, past_key_values=cache_of(out))


def test_stock_matches_transformers_own_classes(tmp_path):
    vanilla = ("model.iterations=1", "model.max_iterations=1", "model.injection=none", "model.iter_norm=false",
               "model.post_norm=false", "model.mlp=swiglu", "model.norm=rmsnorm", "model.guidance=none",
               "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2")  # fmt: skip
    for qk, tie, cls in (("false", "true", "LlamaForCausalLM"), ("true", "false", "Qwen3ForCausalLM")):
        cfg = tiny_config(*vanilla, f"model.qk_norm={qk}", f"model.tie_embeddings={tie}")
        model = random_model(cfg.model, seed=13)
        export_model(model, cfg, tmp_path / cls, fmt="stock")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / cls)).eval()
        assert type(hf).__name__ == cls
        tok = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (2, 16))
        np.testing.assert_allclose(logits(hf, tok), np.asarray(model(jnp.asarray(tok), 1)), **TOL)
        fresh = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(str(tmp_path / cls)))
        assert set(fresh.state_dict()) == set(hf.state_dict())  # the names are the class's own


def generate_both(wd, out, capsys, prompt: str, depths=range(1, 7)):
    """(asura.generate's stdout, the exported model's greedy completion shown the same way) per depth."""
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    hf = hf_load(out)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == [list(prompt.encode())]
    pairs = []
    for n in depths:
        argv = ["--workdir", str(wd), "--depth", str(n), "--prompt", prompt, "--max-new-tokens", "8",
                "--extrapolation", "last"]  # fmt: skip
        assert generate_cli.main(argv) == 0
        ours = capsys.readouterr().out
        new = hf.generate(ids, depth=n, extrapolation="last", max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        pairs.append((n, ours, show(ByteTokenizer(), new.tolist()) + "\n"))
    return pairs


@pytest.mark.parametrize("arm", ["demo", "every_trick"])
def test_generate_matches_asura_generate(arm, tmp_path, capsys):
    """The issue's bar: export a run, load it in transformers (trust_remote_code), and generate the tokens
    `python -m asura.generate` generates at depths 1-6 (past the run's max_iterations with extrapolation)."""
    overrides = () if arm == "demo" else EVERY_TRICK
    wd = train_demo(tmp_path / "run", *overrides, "train.steps=6", "train.checkpoint_every=6")
    assert run_export(["--workdir", wd, "--out", tmp_path / "exp"], capsys)[0] == 0
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["adapter"] == ("abba" if arm == "every_trick" else "none")
    for n, ours, theirs in generate_both(wd, tmp_path / "exp", capsys, "12+34="):
        assert ours == theirs, (n, ours, theirs)


def test_tiktoken_tokenizer_is_converted(tmp_path, monkeypatch):
    """A tiktoken run's tokenizer, converted by transformers from the encoding asura trained with, gives the
    same ids (a small offline encoding stands in for a downloaded one)."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b" t": 258}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding(name="tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    cfg = tiny_config("data.tokenizer=tiktoken:tiny", "model.vocab_size=259")
    old = os.umask(0o022)
    try:
        export_model(random_model(cfg.model), cfg, tmp_path / "e")
    finally:
        os.umask(old)
    # transformers' converter writes a subdirectory: it must stay traversable (0o755, not 0o644)
    modes = {
        p.relative_to(tmp_path / "e").as_posix(): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").rglob("*")
    }
    assert {m for p, m in modes.items() if (tmp_path / "e" / p).is_dir()} == {0o755}, modes
    assert {m for p, m in modes.items() if (tmp_path / "e" / p).is_file()} == {0o644}, modes
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "e"), trust_remote_code=True)
    text = "abc ab t, tt 12+34= é"
    assert tok(text, add_special_tokens=False).input_ids == enc.encode_ordinary(text)
    assert tok.decode(enc.encode_ordinary(text)) == text


def test_dtypes_compute_what_asura_computes(tmp_path):
    """bf16 parameters with fp32 compute equal asura at fp32 tolerance whatever dtype transformers loads
    them in (the weights are cast at use, as asura casts them); bf16 compute is as close to the fp32 model
    as asura's own bf16 is, and really runs in bf16; the gate's λ works on bf16 weights."""
    from asura.config import with_overrides

    tok = np.random.default_rng(5).integers(0, 32, (2, 16))
    for name in sorted(VARIANTS):
        cfg = tiny_config(*VARIANTS[name], "model.param_dtype=bfloat16")
        model = random_model(cfg.model, seed=14)
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
        export_model(model, cfg, tmp_path / name)
        hf = hf_load(tmp_path / name)
        assert next(hf.parameters()).dtype == torch.bfloat16  # transformers loads them as stored
        for n in (1, 2):
            np.testing.assert_allclose(logits(hf, tok, depth=n), np.asarray(model(jnp.asarray(tok), n)), **TOL)
        if cfg.model.exit_gate:
            normed, _ = hf.model(torch.as_tensor(tok[:1]), torch.arange(16)[None], torch.ones(1, 1, 16, 16).tril() > 0)
            h = model.run_loop(jnp.asarray(tok[:1]), cfg.model.iterations).h_BTD
            np.testing.assert_allclose(hf.exit_prob(normed).detach().numpy(), np.asarray(model.exit_prob(h)), **TOL)

        fp32 = with_overrides(cfg, {"model.param_dtype": "float32"})
        bf = with_overrides(fp32, {"model.dtype": "bfloat16"})
        f32_model = random_model(fp32.model, seed=15)
        params = nnx.to_pure_dict(nnx.state(f32_model, nnx.Param))
        bf_model = model_from_params(bf, params)
        export_model(bf_model, bf, tmp_path / f"{name}_bf16")
        hf = hf_load(tmp_path / f"{name}_bf16")
        _, h = hf.model(torch.as_tensor(tok), torch.arange(16)[None].expand(2, -1), torch.ones(1, 1, 16, 16).tril() > 0)
        assert h.dtype == torch.bfloat16
        for n in (1, 2):
            exact = np.asarray(f32_model(jnp.asarray(tok), n))
            ours = np.abs(np.asarray(bf_model(jnp.asarray(tok), n)).astype(np.float32) - exact).max()
            theirs = np.abs(logits(hf, tok, depth=n) - exact).max()
            # XLA fuses bf16 elementwise chains in fp32 and rounds once, torch rounds per op: two rounding paths
            # of the same size (u = 2^-8 per rounding). Ask torch's bf16 to be as close to the fp32 model as
            # asura's bf16 is, within a factor 2; a missing cast (fp32 weights into a bf16 product, a bf16
            # softmax) or a wrong slot is far outside it
            assert theirs <= 2 * ours, (name, n, theirs, ours)


def test_caches_transformers_would_size_wrongly_are_refused(tmp_path):
    cfg = tiny_config(*VARIANTS["every_trick"])
    export_model(random_model(cfg.model, seed=16), cfg, tmp_path / "e")
    hf = hf_load(tmp_path / "e")
    ids = torch.as_tensor(np.arange(6)[None])
    sized = transformers.DynamicCache(config=hf.config)  # num_hidden_layers entries: one iteration's worth
    with pytest.raises(ValueError, match=r"depth 3 caches 6 \(iteration, layer\) entries: pass DynamicCache\(\)"):
        hf.generate(ids, depth=3, past_key_values=sized, max_new_tokens=2, do_sample=False)
    out = hf(ids, depth=4, extrapolation="last", use_cache=True)
    mixed = r"filled at depth 4, extrapolation 'last'.*got depth 4, extrapolation 'cycle'"
    with pytest.raises(ValueError, match=mixed):
        hf(ids[:, :1], depth=4, extrapolation="cycle", past_key_values=cache_of(out))


def test_save_pretrained_round_trips_into_asura(tmp_path):
    """transformers' own save_pretrained of a loaded export still imports into asura bit for bit."""
    from asura.io.export import load_export

    cfg = tiny_config(*VARIANTS["lora_swiglu_gqa_untied_rms_add_zero_gate"])
    model = random_model(cfg.model, seed=17)
    export_model(model, cfg, tmp_path / "e")
    hf_load(tmp_path / "e").save_pretrained(str(tmp_path / "resaved"))
    back = load_export(tmp_path / "resaved")
    tok = jnp.asarray(np.arange(12)[None] % 32)
    assert np.asarray(back.model(tok, 3)).tobytes() == np.asarray(model(tok, 3)).tobytes()
