"""Export a trained model for others: safetensors + config.json + tokenizer, in one of two formats,
and import it back into asura.

    asura   model.safetensors, config.json (AsuraConfig: every flag that changes the forward pass),
            generation_config.json, the tokenizer, and configuration_asura.py + modeling_asura.py
            (asura/io/hf/): transformers loads it with trust_remote_code=True, any depth and
            extrapolation as a forward/generate argument.
    stock   a vanilla config (one iteration, no loop tricks, RMSNorm + SwiGLU + RoPE) as a stock
            transformers architecture, no remote code: Qwen3 with QK-norm, Llama without.

Tensor names come from asura.io.names (Llama's where they exist), weights are written by
safetensors.numpy (no torch needed), and every config.json keeps the run's whole YAML config
(`asura_config`), from which `load_export` rebuilds the asura model bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asura.io.names import NameTableError, from_hf, to_hf
from asura.storage.paths import is_remote

FORMATS = ("asura", "stock")
HF_FILES = ("configuration_asura.py", "modeling_asura.py")
WEIGHTS = "model.safetensors"
# config.json keys that may change without changing the model: load dtype, provenance, transformers' own
FREE_KEYS = frozenset(
    ("dtype", "torch_dtype", "use_cache", "initializer_range", "asura_config", "asura_step", "bos_token_id",
     "eos_token_id", "pad_token_id", "auto_map", "max_position_embeddings")
)  # fmt: skip
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ExportError(ValueError):
    """A bad export request (output directory, config the format cannot express, ...); one line."""


@dataclass(frozen=True)
class Exported:
    out: Path
    format: str
    architecture: str  # AsuraForCausalLM | LlamaForCausalLM | Qwen3ForCausalLM
    step: int
    tensors: int
    files: tuple[str, ...]


# ------------------------------------------------------------------ pure: what a config exports as
def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not valid; choose one of {', '.join(FORMATS)}")


def stock_refusal(m) -> str | None:
    """Why a ModelConfig has no stock transformers architecture (naming the flag), or None."""
    checks = (
        (m.iterations == 1, f"model.iterations={m.iterations}: a stock model runs each layer once"),
        (m.injection == "none", f"model.injection={m.injection}: a stock model has no input injection"),
        (not m.iter_norm, "model.iter_norm=true: a stock model has no per-iteration norm"),
        (not m.post_norm, "model.post_norm=true: a stock model has no post-block norm"),
        (m.adapter == "none", f"model.adapter={m.adapter}: a stock model has no per-iteration adapters"),
        (not m.exit_gate, "model.exit_gate=true: a stock model has no exit gate"),
        (m.mlp == "swiglu", f"model.mlp={m.mlp}: Llama/Qwen3 MLPs are SwiGLU"),
        (m.norm == "rmsnorm", f"model.norm={m.norm}: Llama/Qwen3 norms are RMSNorm"),
        (m.position == "rope", f"model.position={m.position}: Llama/Qwen3 use RoPE"),
        (m.loop_start == "embed", f"model.loop_start={m.loop_start}: a stock model reads the embeddings"),
        (m.dtype == m.param_dtype, f"model.dtype={m.dtype} with param_dtype={m.param_dtype}: a stock model computes "
         "in the dtype its weights load in"),
    )  # fmt: skip
    return next((why for ok, why in checks if not ok), None)


def stock_architecture(m) -> str:
    """qwen3 (QK-norm) or llama; ExportError naming the flag a stock model cannot express."""
    why = stock_refusal(m)
    if why is not None:
        raise ExportError(f"--format stock: {why}; export it with --format asura (trust_remote_code)")
    return "qwen3" if m.qk_norm else "llama"


def _common(cfg) -> dict:
    m = cfg.model
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.d_head,
        "intermediate_size": m.ff_dim,
        "num_hidden_layers": m.n_layers,
        "max_position_embeddings": cfg.data.seq_len,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "dtype": HF_DTYPES[m.param_dtype],
        "torch_dtype": HF_DTYPES[m.param_dtype],
        "use_cache": True,
        # asura's models have no special tokens (a task's answer ends at a newline): no BOS/EOS/PAD defaults
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def hf_config(cfg, fmt: str, step: int) -> dict:
    """config.json for a run's Config in format asura | stock (the run's YAML kept as asura_config)."""
    from asura.config import config_to_yaml

    m = cfg.model
    provenance = {"asura_config": config_to_yaml(cfg), "asura_step": step}
    if fmt == "stock":
        arch = stock_architecture(m)
        cls = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
        stock = {
            "architectures": [cls],
            "model_type": arch,
            "hidden_act": "silu",
            "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
        }
        stock |= {"mlp_bias": False} if arch == "llama" else {"use_sliding_window": False, "sliding_window": None}
        return {**stock, **_common(cfg), **provenance}
    return {
        "architectures": ["AsuraForCausalLM"],
        "model_type": "asura",
        "auto_map": {
            "AutoConfig": "configuration_asura.AsuraConfig",
            "AutoModelForCausalLM": "modeling_asura.AsuraForCausalLM",
        },
        **_common(cfg),
        "depth": m.iterations,
        "max_iterations": m.max_iterations,
        "extrapolation": m.extrapolation,
        "mlp": m.mlp,
        "norm": m.norm,
        "norm_eps": m.norm_eps,
        "injection": m.injection,
        "loop_start": m.loop_start,
        "iter_norm": m.iter_norm,
        "post_norm": m.post_norm,
        "adapter": m.adapter,
        "adapter_rank": m.adapter_rank,
        "adapter_rank2": m.adapter_rank2,
        "adapter_gamma": m.adapter_gamma,
        "adapter_targets": list(m.adapter_targets),
        "exit_gate": m.exit_gate,
        "qk_norm": m.qk_norm,
        "position": m.position,
        "rope_theta": m.rope_theta,
        "compute_dtype": m.dtype,
        **provenance,
    }


# ------------------------------------------------------------------------------ files
def check_out(out) -> Path:
    """The output directory: local, and absent or empty (nothing is ever overwritten)."""
    s = os.fspath(out)
    if is_remote(s):
        raise ExportError(f"--out {s} is not a local directory (export locally, then upload, e.g. `hf upload`)")
    p = Path(s).expanduser()
    if p.exists() and not p.is_dir():
        raise ExportError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        raise ExportError(f"--out {p} exists and is not empty; choose a new or empty directory")
    return p


def _byte_tokenizer(dest: Path, seq_len: int) -> None:
    """asura's byte tokenizer (id = byte value, vocab 256) as a tokenizers JSON: byte-level, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(dest / "tokenizer.json"))
    _tokenizer_config(dest, seq_len)


def _tokenizer_config(dest: Path, seq_len: int) -> None:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
           "clean_up_tokenization_spaces": False}  # fmt: skip
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def check_tokenizer(spec: str) -> None:
    """Refuse, before loading anything, a tokenizer the export cannot write."""
    if spec == "byte" or spec.endswith(".json"):
        return
    if spec.startswith("tiktoken:"):
        try:
            import blobfile  # noqa: F401  (transformers' converter writes the BPE file through it)
            import transformers.integrations.tiktoken  # noqa: F401
        except ImportError:
            raise ExportError(f"data.tokenizer={spec}: converting a tiktoken encoding needs transformers and "
                              "blobfile (pip install 'asura[hf]')") from None  # fmt: skip
        return
    raise ExportError(
        f"data.tokenizer={spec!r} cannot be exported; valid: byte, path/to/tokenizer.json, tiktoken:<enc>"
    )


def write_tokenizer(spec: str, dest: Path, seq_len: int) -> None:
    if spec == "byte":
        return _byte_tokenizer(dest, seq_len)
    if spec.startswith("tiktoken:"):  # the encoding as training loaded it, converted by transformers
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast

        from asura.data.tokenizer import load_tokenizer

        try:
            convert_tiktoken_to_fast(load_tokenizer(spec).encoding, str(dest))
        except ValueError as e:
            raise ExportError(f"data.tokenizer={spec}: {str(e).splitlines()[0]}") from None
        return _tokenizer_config(dest, seq_len)
    try:
        shutil.copyfile(spec, dest / "tokenizer.json")
    except OSError as e:
        raise ExportError(f"data.tokenizer={spec}: cannot copy it ({e.strerror})") from None
    _tokenizer_config(dest, seq_len)


def flat_params(model) -> dict[tuple, np.ndarray]:
    """{NNX path: numpy array} of a LoopedLM's parameters."""
    from flax import nnx

    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _card(cfg, fmt: str, arch: str, step: int) -> str:
    m = cfg.model
    if fmt == "asura":
        load = (
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
            f"# any depth; past {m.max_iterations}: extrapolation='last' or 'cycle'\n"
            f"model.generate(ids, depth={m.iterations}, do_sample=False)"
        )
    else:
        load = "AutoModelForCausalLM.from_pretrained(path)"
    return (
        f"# {cfg.name}: asura export ({arch})\n\n"
        f"Checkpoint step {step}; {m.n_layers} shared block(s) of width {m.d_model}, trained at depth {m.iterations} "
        f"(max_iterations {m.max_iterations}). Written by `python -m asura.export`; the run's whole config is "
        "`asura_config` in config.json.\n\n"
        f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = {load}\n```\n"
    )


def _readable(d: Path) -> None:
    """mkdtemp and safetensors create owner-only files; an export is for sharing (the umask decides)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(d):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _write(tensors, config, cfg, fmt: str, step: int, dest: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(dest / WEIGHTS), metadata={"format": "pt", "asura_step": str(step)})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"do_sample": False}  # greedy, as python -m asura.generate; the context is config.json's
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_tokenizer(cfg.data.tokenizer, dest, cfg.data.seq_len)
    if fmt == "asura":
        for name in HF_FILES:
            shutil.copyfile(Path(__file__).parent / "hf" / name, dest / name)
    (dest / "README.md").write_text(_card(cfg, fmt, config["architectures"][0], step))
    _readable(dest)


def export_model(model, cfg, out, *, fmt: str = "asura", step: int = 0) -> Exported:
    """Write a LoopedLM (with its run Config) to the empty or new local directory ``out``. Everything is
    checked before anything is written, and the files are written into a temporary directory first: a
    new ``out`` appears whole (one rename); into an existing empty one the finished files are moved."""
    check_format(fmt)
    out = check_out(out).resolve()
    check_tokenizer(cfg.data.tokenizer)
    config = hf_config(cfg, fmt, step)  # refuses a config the format cannot express
    tensors = to_hf(flat_params(model))
    existed = out.is_dir()
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # beside a new out (renamed into place), inside an existing one (its parent may not be ours to write)
        tmp = Path(tempfile.mkdtemp(prefix=".asura-export-", dir=out if existed else out.parent))
        _write(tensors, config, cfg, fmt, step, tmp)
        if existed:
            for p in tmp.iterdir():
                os.replace(p, out / p.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write --out {out}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = tuple(sorted(p.name for p in out.iterdir()))
    return Exported(out, fmt, config["architectures"][0], step, len(tensors), files)


def export(workdir, out, *, step=None, fmt: str = "asura", warn=None) -> Exported:
    """Export a run's checkpoint (asura.io.load.load's step: int, latest/None or best)."""
    from asura.io.load import load, resolve

    check_format(fmt)
    target = check_out(out).resolve()  # before loading anything
    run, _ = resolve(workdir)  # the workdir of any accepted path (checkpoints/<step> included)
    if not is_remote(run) and (target == Path(run) or Path(run) in target.parents):
        raise ExportError(f"--out {out} is inside the run's workdir {run}; export it elsewhere")
    loaded = load(workdir, step, warn=warn)
    return export_model(loaded.model, loaded.cfg, out, fmt=fmt, step=loaded.step)


@dataclass
class Imported:
    model: object  # LoopedLM
    cfg: object  # asura.config.Config
    step: int


def load_export(path) -> Imported:
    """The asura model of an exported directory (either format), bit for bit what was exported."""
    from safetensors.numpy import load_file

    from asura.config import ConfigError, config_from_yaml

    p = Path(os.fspath(path)).expanduser()
    for name in ("config.json", WEIGHTS):
        if not (p / name).is_file():
            raise ExportError(f"{p} has no {name} (expected a directory written by python -m asura.export)")
    meta = json.loads((p / "config.json").read_text())
    if not meta.get("asura_config"):
        raise ExportError(f"{p / 'config.json'} has no asura_config (not written by python -m asura.export)")
    try:
        cfg = config_from_yaml(meta["asura_config"])
    except ConfigError as e:
        raise ExportError(f"{p / 'config.json'}: asura_config is not a valid config: {e}") from None
    # PyTorch reads the top-level keys, asura the YAML: an edit to either would make them two models
    fmt = "asura" if meta.get("model_type") == "asura" else "stock"
    try:
        expect = hf_config(cfg, fmt, 0)
    except ExportError as e:
        raise ExportError(f"{p / 'config.json'}: asura_config does not fit its model_type: {e}") from None
    for key, value in expect.items():
        if key not in FREE_KEYS and meta.get(key, value) != value:
            raise ExportError(f"{p / 'config.json'}: {key}={meta[key]!r} disagrees with asura_config ({value!r}); "
                              "the file was edited: re-export, or edit both")  # fmt: skip
    import jax.numpy as jnp
    from flax import traverse_util

    from asura.train.state import abstract_state, merge_model

    built = abstract_state(cfg)
    like = {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(built.state["params"]).items()}
    try:
        flat = from_hf(load_file(str(p / WEIGHTS)), like)
    except NameTableError as e:
        raise ExportError(f"{p / WEIGHTS}: {e}") from None
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return Imported(merge_model(built.graphdef, params, built.rest), cfg, int(meta.get("asura_step", 0)))
