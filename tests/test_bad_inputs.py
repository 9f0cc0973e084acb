"""Every CLI answers bad input the same way: one table, one set of checks per row.

Each row of CASES is (CLI, argv, needle[, setup]). `_check` runs it and asserts:

  (a) exit status 2;
  (b) exactly one non-empty line on stderr, and it holds the needle (names the problem);
  (c) no Python traceback in stdout or stderr (an escaping exception counts as one);
  (d) nothing under the case's directories changed: a finished 2-step tiny run (config.yaml,
      metrics.jsonl, checkpoints/2), the shared prepared corpus and the case's own tmp dir
      are snapshotted (every path, every file's bytes) before and compared after;
  (e) it failed before any compilation.

Most rows run in-process (`train.main(argv)`, `asura.data.prepare.main`, `asura.sweep.__main__.main`,
`asura.flops.main`) so the battery stays fast; SUBPROCESS_CASES run the real entry points a few
times to show they behave the same.

How (e) is seen: in-process, a `jax.monitoring` listener records every event whose name holds
"compil" (``/jax/core/compile/jaxpr_to_mlir_module_duration``, ``.../backend_compile_duration``,
``/jax/compilation_cache/...``) while a case runs; jax.clear_caches() first, so a program another
test already compiled would show up as a compile here too rather than as a silent cache hit.
Tracing alone (``jaxpr_trace_duration``, e.g. jax.eval_shape) is not compilation and is allowed.
In a subprocess: the run takes < SUBPROCESS_LIMIT_S and no checkpoints/<step> appears (part of (d)).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DEMO, ROOT, TINY, quiet, tiny_config, train_main

SUBPROCESS_LIMIT_S = 20.0  # a compile of even the tiny model plus imports takes longer on 2 busy cores
COMPILE_MARK = "compil"  # matches /jax/core/compile/* and /jax/compilation_cache/*
NOT_COMPILE = ("jaxpr_trace_duration",)  # tracing (eval_shape) builds no program
IGNORED = ()  # a refusal leaves every file as it was, the lock file included


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step tiny run: config.yaml, metrics.jsonl, checkpoints/2 (trained once per module)."""
    from asura.train.loop import FAST_COMPILE, run

    wd = tmp_path_factory.mktemp("finished") / "run"
    # train.py's default config (demo.yaml) under TINY: a CLI row differs from it only in its own overrides.
    extra = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.async_checkpoint=false")
    cfg = tiny_config(*extra, base=DEMO)
    summary = run(cfg, wd, say=quiet, compiler_options=FAST_COMPILE, install_signal_handlers=False)
    assert summary["status"] == "done" and summary["step"] == 2
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/2"):
        assert (wd / name).exists(), name
    return wd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Good prepared shards (40 small documents, about 10% held out for eval)."""
    from asura.data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "shards"
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(["ab", "cd", "efg"], size=50)) for _ in range(40)]
    prepare(docs, str(out), eval_fraction=0.1, eval_min_tokens=200)
    return out


@pytest.fixture(scope="module")
def compile_events():
    """Names of compile events seen since the list was last cleared (listeners live for this module)."""
    seen: list[str] = []

    def on_duration(name: str, _secs: float, **_kw) -> None:
        on_event(name)

    def on_event(name: str, **_kw) -> None:
        if COMPILE_MARK in name and not any(n in name for n in NOT_COMPILE):
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    yield seen
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)


@dataclass(frozen=True)
class Env:
    """Paths a case's argv and setup may name, as {wd} {tmp} {corpus} {demo} {root}."""

    wd: Path  # the finished tiny run
    corpus: Path  # the good prepared shards
    tmp: Path  # this case's own directory

    def fill(self, arg: str) -> str:
        for key, val in (("wd", self.wd), ("tmp", self.tmp), ("corpus", self.corpus), ("demo", DEMO), ("root", ROOT)):
            arg = arg.replace("{" + key + "}", str(val))
        return arg


@pytest.fixture
def env(finished, corpus, tmp_path) -> Env:
    return Env(wd=finished, corpus=corpus, tmp=tmp_path)


# ------------------------------------------------------------------ the checks


@dataclass(frozen=True)
class Case:
    cli: str  # train | prepare | sweep | flops
    argv: tuple[str, ...]
    needle: str  # must appear in the one stderr line
    setup: Callable[[Env], contextlib.AbstractContextManager | None] | None = None  # may skip, may hold a lock


def _main(cli: str) -> Callable:
    if cli == "train":
        return train_main()
    if cli == "prepare":
        from asura.data.prepare import main
    elif cli == "sweep":
        from asura.sweep.__main__ import main
    elif cli == "flops":
        from asura.flops import main
    else:
        raise AssertionError(f"unknown cli {cli!r}")
    return main


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every path under the roots: a file's bytes, None for a directory."""
    out: dict[str, bytes | None] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.name in IGNORED:
                out[str(p)] = b"(exists)"
            elif p.is_dir():
                out[str(p)] = None
            else:
                out[str(p)] = p.read_bytes()
    return out


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k, "missing") != after.get(k, "missing"))


def _problems(rc, out: str, err: str, needle: str, before: dict, after: dict) -> list[str]:
    """What (a)-(d) find wrong, all of it, so one failure reports every broken promise."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    found = []
    if rc != 2:
        found.append(f"(a) exit status {rc}, not 2")
    if len(lines) != 1:
        found.append(f"(b) {len(lines)} non-empty stderr lines, not 1")
    elif needle not in lines[0]:
        found.append(f"(b) the line does not name the problem: {needle!r} not in it")
    if "Traceback" in out + err:
        found.append("(c) a traceback")
    if changed := _changed(before, after):
        found.append(f"(d) changed or created: {changed[:5]}")
    return found


def _report(found: list[str], rc, out: str, err: str) -> str:
    return "\n".join([*found, f"--- exit {rc}; stderr ---", err, "--- stdout ---", out])


def _run_in_process(main: Callable, argv: list[str]) -> tuple[int | str | None, str]:
    """(exit status, extra stderr): SystemExit's code or the return value; an escaping exception is a traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # anything else escaping main() is a traceback from the real CLI
        return None, f"Traceback (escaped {type(e).__name__}): {str(e)[:500]}"
    return (0 if rc is None else rc), ""


def _check(case: Case, env: Env, capsys, compile_events: list[str]) -> None:
    from asura.train.workdir import Signals

    main = _main(case.cli)
    argv = [env.fill(a) for a in case.argv]
    held = case.setup(env) if case.setup is not None else None
    with held or contextlib.nullcontext():
        before = snapshot(env.wd, env.corpus, env.tmp)
        capsys.readouterr()
        jax.clear_caches()
        compile_events.clear()
        try:
            rc, escaped = _run_in_process(main, argv)
        finally:
            Signals.restore()  # train.main installs SIGTERM/SIGINT handlers and exits before restoring them
        out, err = capsys.readouterr()
        compiled = list(compile_events)
        after = snapshot(env.wd, env.corpus, env.tmp)
    found = _problems(rc, out, err + escaped, env.fill(case.needle), before, after)
    if compiled:
        found.append(f"(e) compiled before failing: {sorted(set(compiled))}")
    assert not found, _report(found, rc, out, err + escaped)


# ------------------------------------------------------------------ setups


def _files(files: dict[str, str]):
    """Setup: write each tmp/name (the text may name {demo} {tmp} ...)."""

    def setup(env: Env) -> None:
        for name, text in files.items():
            (env.tmp / name).write_text(env.fill(text))

    return setup


def _write(name: str, text: str):
    return _files({name: text})


def _write_bytes(name: str, data: bytes):
    def setup(env: Env) -> None:
        (env.tmp / name).write_bytes(data)

    return setup


def _shards(edit: Callable[[Path], None]):
    """Setup: a copy of the good corpus at tmp/shards, then `edit(copy)`."""

    def setup(env: Env) -> None:
        d = env.tmp / "shards"
        shutil.copytree(env.corpus, d)
        edit(d)

    return setup


def _rm_eval(d: Path) -> None:
    for p in d.glob("eval-*.array_record"):
        p.unlink()


def _garbage(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _json_meta(**changes):
    def edit(d: Path) -> None:
        meta = json.loads((d / "metadata.json").read_text())
        (d / "metadata.json").write_text(json.dumps({**meta, **changes}))

    return edit


def _copy_finished(env: Env) -> None:
    shutil.copytree(env.wd, env.tmp / "run")


def _lock_finished(env: Env):
    from asura.train.workdir import WorkdirLock

    return WorkdirLock(env.wd)  # a context manager: held (by this process) while the case runs


def _needs_non_root(what: str):
    def setup(env: Env) -> None:
        if os.geteuid() == 0:
            pytest.skip(f"{what}: running as root, where chmod does not stop writes and os.access says yes")
        _copy_finished(env)

    return setup


def _fewer_devices_than(n: int):
    def setup(env: Env) -> None:
        if jax.device_count() >= n:
            pytest.skip(f"{jax.device_count()} devices: a mesh of {n} fits here")

    return setup


def _needs_proc(env: Env) -> None:
    if not Path("/proc").is_dir():
        pytest.skip("no /proc: nothing here refuses mkdir for every user")


def _readonly_parent(env: Env) -> None:
    _needs_non_root("workdir's parent not writable")(env)
    (env.tmp / "ro").mkdir()
    (env.tmp / "ro").chmod(0o555)


def _readonly_workdir(env: Env) -> None:
    _needs_non_root("read-only workdir")(env)
    (env.tmp / "run").chmod(0o555)


def _readonly_checkpoints(env: Env) -> None:
    _needs_non_root("read-only checkpoints dir")(env)
    (env.tmp / "run" / "checkpoints").chmod(0o555)


# ------------------------------------------------------------------ the table


def train(id: str, *args: str, needle: str, setup=None, tiny: bool = True, workdir: str = "{wd}"):
    """A train.py row: --workdir (default: the finished run), TINY, then the case's args."""
    argv = ("--workdir", workdir, *(TINY if tiny else ()), *args)
    return pytest.param(Case("train", argv, needle, setup), id=f"train-{id}")


def prepare(id: str, *args: str, needle: str, setup=None):
    return pytest.param(Case("prepare", args, needle, setup), id=f"prepare-{id}")


def sweep(id: str, *args: str, needle: str, setup=None):
    return pytest.param(Case("sweep", args, needle, setup), id=f"sweep-{id}")


def flops(id: str, *args: str, needle: str, setup=None):
    return pytest.param(Case("flops", args, needle, setup), id=f"flops-{id}")


# mkdir fails here for every user, root included, though os.access("/proc", W_OK) is True for root:
# the one "parent not writable" case that also bites where chmod does not.
UNCREATABLE = "/proc/asura-bad-input-run"
SPEC = "base: {demo}\noverrides: {train.steps: 2}\n"  # a valid sweep spec, to break one key at a time

CASES = [
    # ---- config: unknown keys (did-you-mean)
    train("unknown-model-key", "model.d_modle=32", needle="did you mean 'd_model'"),
    train("unknown-section", "trian.steps=3", needle="did you mean 'train'"),
    train("unknown-data-key", "data.seqlen=32", needle="did you mean 'seq_len'"),
    train("unknown-depth-key", "depth.schedul=uniform", needle="did you mean 'schedule'"),
    train("unknown-mesh-key", "mesh.dta=1", needle="unknown config key 'mesh.dta'"),
    train("unknown-top-key", "bogus=1", needle="unknown config key 'bogus'"),
    # ---- config: wrong types
    train("int-is-word", "train.steps=abc", needle="train.steps must be an integer"),
    train("int-is-fraction", "train.steps=2.5", needle="train.steps must be an integer"),
    train("int-is-bool", "train.steps=true", needle="train.steps must be an integer"),
    train("int-is-list", "model.d_model=[32]", needle="model.d_model must be an integer"),
    train("float-is-word", "train.lr=fast", needle="train.lr must be a number"),
    train("float-is-bool", "train.lr=true", needle="train.lr must be a number"),
    train("bool-is-int", "train.progress=1", needle="train.progress must be true or false"),
    train("bool-is-word", "train.progress=maybe", needle="train.progress must be true or false"),
    train("str-is-list", "model.attention=[xla, cudnn]", needle="model.attention must be a string"),
    train("str-is-mapping", "name={a: 1}", needle="name must be a string"),
    train("list-elem-type", "train.eval_depths=[1, x]", needle="train.eval_depths[1] must be an integer"),
    train("section-is-scalar", "model=3", needle="model must be a mapping"),
    train("rules-is-scalar", "mesh.rules=3", needle="mesh.rules must be a mapping"),
    # ---- config: NaN / Inf floats
    train("lr-nan", "train.lr=.nan", needle="train.lr must be a finite number"),
    train("lr-inf", "train.lr=.inf", needle="train.lr must be a finite number"),
    train("lr-neg-inf", "train.lr=-.inf", needle="train.lr must be a finite number"),
    train("lr-nan-word", "train.lr=nan", needle="train.lr must be a finite number"),
    train("init-std-nan", "model.init_std=.nan", needle="model.init_std must be a finite number"),
    train("z-loss-inf", "model.z_loss=inf", needle="model.z_loss must be a finite number"),
    train("b1-nan", "train.b1=.nan", needle="train.b1 must be a finite number"),
    # ---- config: negative / zero sizes and out-of-range values
    train("d-model-zero", "model.d_model=0", needle="model.d_model must be > 0"),
    train("d-model-negative", "model.d_model=-32", needle="model.d_model must be > 0"),
    train("n-layers-zero", "model.n_layers=0", needle="model.n_layers must be > 0"),
    train("vocab-zero", "model.vocab_size=0", needle="model.vocab_size must be > 0"),
    train("iterations-zero", "model.iterations=0", needle="model.iterations must be > 0"),
    train("kv-heads-negative", "model.n_kv_heads=-1", needle="model.n_kv_heads must be >= 0"),
    train("batch-zero", "train.batch_size=0", needle="train.batch_size must be > 0"),
    train("steps-negative", "train.steps=-1", needle="train.steps must be > 0"),
    train("lr-zero", "train.lr=0", needle="train.lr must be > 0"),
    train("warmup-negative", "train.warmup_steps=-1", needle="train.warmup_steps must be >= 0"),
    train("keep-zero", "train.keep_checkpoints=0", needle="train.keep_checkpoints must be > 0"),
    train("seed-negative", "train.seed=-1", needle="train.seed must be >= 0"),
    train("seq-len-zero", "data.seq_len=0", needle="data.seq_len must be > 0"),
    train("prefetch-negative", "data.prefetch=-1", needle="data.prefetch must be >= 0"),
    train("bptt-negative", "depth.bptt_k=-1", needle="depth.bptt_k must be >= 0"),
    train("sigma-zero", "depth.schedule=poisson_lognormal", "depth.sigma=0", needle="depth.sigma must be > 0"),
    train("min-lr-ratio", "train.min_lr_ratio=1.5", needle="train.min_lr_ratio must be in [0, 1]"),
    train("b2-one", "train.b2=1.0", needle="train.b1 and train.b2 must be in [0, 1)"),
    train("eps-negative", "train.eps=-1e-8", needle="train.eps must be > 0"),
    train("eps-zero", "train.eps=0", needle="train.eps must be > 0"),
    train("name-with-slash", "name=a/b", needle="name='a/b' must be a non-empty name without path separators"),
    train("name-empty", "name=''", needle="name='' must be a non-empty name"),
    # ---- config: every enum / registry key with a bad value
    train("attention", "model.attention=bogus", needle="model.attention='bogus' is not valid; choose one of"),
    train("remat", "model.remat=bogus", needle="model.remat='bogus' is not valid; choose one of"),
    train("adapter", "model.adapter=bogus", needle="model.adapter='bogus' is not valid; choose one of"),
    train("schedule", "depth.schedule=bogus", needle="depth.schedule='bogus' is not valid; choose one of"),
    train("source", "data.source=bogus", needle="data.source='bogus' is not valid; choose one of"),
    train("mlp", "model.mlp=relu", needle="model.mlp='relu' is not valid; choose one of gelu, swiglu"),
    train("norm", "model.norm=batchnorm", needle="model.norm='batchnorm' is not valid"),
    train("injection", "model.injection=concat", needle="model.injection='concat' is not valid"),
    train("guidance", "model.guidance=exponential", needle="model.guidance='exponential' is not valid"),
    train("extrapolation", "model.extrapolation=wrap", needle="model.extrapolation='wrap' is not valid"),
    train("dtype", "model.dtype=float8", needle="model.dtype='float8' is not valid"),
    train("param-dtype", "model.param_dtype=float16", needle="model.param_dtype='float16' is not valid"),
    train("adapter-target", "model.adapter_targets=[q, zz]", needle="model.adapter_targets has 'zz'"),
    # ---- config: cross-field rules
    train("heads-not-dividing", "model.n_heads=3", needle="model.n_heads=3 must divide model.d_model=32"),
    train("odd-head-dim", "model.d_model=30", needle="must be even for RoPE"),
    train("kv-heads", "model.n_heads=4", "model.n_kv_heads=3", needle="model.n_kv_heads=3 must divide model.n_heads=4"),
    train(
        "guidance-weights-length",
        "model.guidance=explicit",
        "model.guidance_weights=[1.0]",
        needle="model.guidance_weights has 1 entries",
    ),
    train(
        "guidance-weights-sum",
        "model.guidance=explicit",
        "model.guidance_weights=[0.3, 0.3]",
        needle="must be non-negative and sum to 1",
    ),
    train(
        "guidance-weights-negative",
        "model.guidance=explicit",
        "model.guidance_weights=[-0.5, 1.5]",
        needle="must be non-negative and sum to 1",
    ),
    train(
        "guidance-weights-order",
        "model.guidance=explicit",
        "model.guidance_weights=[0.7, 0.3]",
        needle="must be non-decreasing",
    ),
    train("guidance-weights-unused", "model.guidance_weights=[0.5, 0.5]", needle="set guidance=explicit"),
    train("ce-chunk", "model.ce_chunk=100", needle="model.ce_chunk=100 must divide model.vocab_size=256"),
    train("adapter-rank-zero", "model.adapter=lora", "model.adapter_rank=0", needle="model.adapter_rank must be > 0"),
    train("adapter-gate-gelu", "model.adapter=lora", "model.adapter_targets=[gate]", needle="no gate projection"),
    train("iterations-past-max", "model.iterations=3", needle="model.iterations=3 exceeds model.max_iterations=2"),
    train("depth-min-zero", "depth.min=0", needle="depth.min must be >= 1"),
    train("depth-max-past-max", "depth.max=5", needle="the depth schedule reaches depth 5"),
    train("depth-min-past-max", "depth.schedule=uniform", "depth.min=3", needle="depth.min=3 exceeds"),
    train("eval-depth-past-max", "train.eval_depths=[1, 5]", needle="train.eval_depths=[1, 5]"),
    train("grad-accum", "train.grad_accum=3", needle="train.grad_accum=3 must divide train.batch_size=8"),
    train("mesh-rule-axis", "mesh.rules.batch=[data, pod]", needle="unknown mesh axis 'pod'"),
    train("mesh-rule-logical", "mesh.rules.bogus=[data]", needle="unknown logical axis 'bogus'"),
    train("mesh-two-fill", "mesh.data=-1", "mesh.fsdp=-1", needle="only one mesh axis may be -1"),
    train("mesh-zero", "mesh.tensor=0", needle="mesh.tensor must be a positive size or -1"),
    train("vocab-below-data", "model.vocab_size=64", needle="data needs vocab_size >= 128"),
    # ---- config files
    train(
        "yaml-invalid", "--config", "{tmp}/bad.yaml", needle="is not valid YAML", setup=_write("bad.yaml", "a: [1,\n")
    ),
    train("yaml-missing", "--config", "{tmp}/missing.yaml", needle="config file not found"),
    train("yaml-is-dir", "--config", "{tmp}", needle="config file not found"),
    train(
        "yaml-is-list",
        "--config",
        "{tmp}/l.yaml",
        needle="must hold a mapping, got list",
        setup=_write("l.yaml", "- 1\n"),
    ),
    train(
        "yaml-extends-cycle",
        "--config",
        "{tmp}/a.yaml",
        needle="config `extends` cycle",
        setup=_files({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}),
    ),
    train(
        "yaml-extends-missing",
        "--config",
        "{tmp}/c.yaml",
        needle="config file not found",
        setup=_write("c.yaml", "extends: nowhere.yaml\n"),
    ),
    train(
        "yaml-binary",
        "--config",
        "{tmp}/b.yaml",
        needle="is not UTF-8 text",
        setup=_write_bytes("b.yaml", bytes(range(256)) * 4),
    ),
    train(
        "yaml-duplicate-key",
        "--config",
        "{tmp}/d.yaml",
        needle="key 'steps' is given twice (first on line 3)",
        setup=_write("d.yaml", "extends: {demo}\ntrain:\n  steps: 3\n  lr: 1.0e-3\n  steps: 4\n"),
    ),
    train(
        "yaml-duplicate-section",
        "--config",
        "{tmp}/d.yaml",
        needle="key 'train' is given twice",
        setup=_write("d.yaml", "extends: {demo}\ntrain: {steps: 3}\nmodel: {n_layers: 1}\ntrain: {lr: 1.0e-3}\n"),
    ),
    train(
        "yaml-unknown-key",
        "--config",
        "{tmp}/u.yaml",
        needle="did you mean 'n_layers'",
        setup=_write("u.yaml", "model:\n  n_layer: 2\n"),
    ),
    # ---- CLI
    train("unknown-flag", "--bogus", needle="--bogus"),
    train("unknown-short-flag", "-x", needle="-x"),
    train("config-without-value", "--config", needle="--config"),
    train("workdir-without-value", "--workdir", needle="--workdir"),
    train("override-without-equals", "model.d_model", needle="must look like section.key=value"),
    train("override-empty-part", "model..d_model=3", needle="has an empty key part"),
    train("override-into-scalar", "model.d_model.x=3", needle="'d_model' is not a section"),
    train("override-unclosed-list", "model.adapter_targets=[q,v", needle="the value is not valid YAML"),
    train("override-unclosed-mapping", "mesh.rules={batch: [data]", needle="the value is not valid YAML"),
    train("override-bad-list-item", "model.adapter_targets=q,[v", needle="is not a comma-separated list"),
    train("override-duplicate-key", "mesh.rules={seq: [], seq: [data]}", needle="key 'seq' is given twice"),
    train("workdir-empty", workdir="", needle="--workdir is empty"),
    train("workdir-blank", workdir="  ", needle="--workdir is empty"),
    # ---- devices / mesh (one CPU device in-process) and memory
    train("mesh-too-big", "mesh.data=4", needle="needs 4 devices but", setup=_fewer_devices_than(4)),
    train(
        "mesh-fixed-not-dividing",
        "mesh.fsdp=3",
        needle="fixed axes (3) do not divide the",
        setup=_fewer_devices_than(3),
    ),
    train("memory-seq-len", "--config", "{demo}", "data.seq_len=65536", tiny=False, needle="GiB per device"),
    train("memory-batch", "data.seq_len=8192", "train.batch_size=4096", needle="GiB per device"),
    # ---- workdir
    train("workdir-is-file", workdir="{root}/README.md", needle="is a file, not a directory"),
    train("workdir-under-file", workdir="{root}/README.md/run", needle="is a file, not a directory"),
    train("parent-read-only", workdir="{tmp}/ro/run", needle="not writable", setup=_readonly_parent),
    train("parent-uncreatable", workdir=UNCREATABLE, needle=UNCREATABLE, setup=_needs_proc),
    train("workdir-read-only", workdir="{tmp}/run", needle="not writable", setup=_readonly_workdir),
    train("checkpoints-read-only", workdir="{tmp}/run", needle="not writable", setup=_readonly_checkpoints),
    train("workdir-locked", needle="is in use by another trainer", setup=_lock_finished),
    # ---- data
    train("task-too-long", "data.task=addition", "data.difficulty=20", needle="data.seq_len=32; raise data.seq_len"),
    train("eval-task-too-long", "data.eval_difficulty=40", needle="data.eval_difficulty=40"),
    train("task-hops", "data.task=pointer_chase", "data.difficulty=14", "data.seq_len=512", needle="must be <= 13"),
    train("task-unknown", "data.task=bogus", needle="unknown data.task 'bogus'"),
    train("task-module", "data.task=no_such_module_xyz:Task", needle="cannot import module 'no_such_module_xyz'"),
    train("task-not-a-task", "data.task=asura.data.tasks:Example", needle="attribute that is not a Task subclass"),
    train("held-out-zero", "data.held_out=0", needle="data.held_out must be in (0, 0.5]"),
    train("held-out-too-few", "data.task=parity", "data.difficulty=6", needle="parity at data.difficulty=6 has 64"),
    train("tokenizer-for-task", "data.tokenizer=byte2", needle="only applies to data.source=text"),
    train("text-no-path", "data.source=text", needle="data.source=text needs data.path"),
    train("text-path-nothing", "data.source=text", "data.path={tmp}/none/*.array_record", needle="matches no"),
    train("text-path-empty-dir", "data.source=text", "data.path={tmp}", needle="matches no train shards"),
    train("text-path-not-shards", "data.source=text", "data.path={root}/README.md", needle="no metadata.json"),
    train(
        "text-garbage-shard",
        "data.source=text",
        "data.path={tmp}/shards",
        needle="is not a readable ArrayRecord file",
        setup=_shards(_garbage("train-00000.array_record", bytes(range(256)) * 100)),
    ),
    train(
        "text-garbage-metadata",
        "data.source=text",
        "data.path={tmp}/shards",
        needle="metadata.json is not valid JSON",
        setup=_shards(_garbage("metadata.json", b"{'format': asura")),
    ),
    train(
        "text-binary-metadata",
        "data.source=text",
        "data.path={tmp}/shards",
        needle="metadata.json is not text",
        setup=_shards(_garbage("metadata.json", bytes(range(256)))),
    ),
    train(
        "text-metadata-format",
        "data.source=text",
        "data.path={tmp}/shards",
        needle="expected 'asura-tokens-v1'",
        setup=_shards(_json_meta(format="other-v0")),
    ),
    train(
        "text-no-eval-split",
        "data.source=text",
        "data.path={tmp}/shards",
        needle="has no eval split",
        setup=_shards(_rm_eval),
    ),
    train(
        "text-tokenizer-missing",
        "data.source=text",
        "data.path={corpus}",
        "data.tokenizer={tmp}/tok.json",
        needle="does not exist",
    ),
    train("text-tokenizer-bogus", "data.source=text", "data.path={corpus}", "data.tokenizer=gpt9", needle="gpt9"),
    train(
        "text-tokenizer-mismatch",
        "data.source=text",
        "data.path={corpus}",
        "data.tokenizer=tiktoken:cl100k_base",
        needle="were tokenised with 'byte'",
    ),
    # ---- checkpoints: a workdir trained with another config (refused before the lock, log, TensorBoard or bar)
    train("resume-other-shape", "model.d_model=64", workdir="{tmp}/run", needle="model.d_model", setup=_copy_finished),
    train(
        "resume-other-shape-sinks-on",
        "model.d_model=64",
        "train.progress=true",
        "train.tensorboard=true",
        workdir="{tmp}/run",
        needle="model.d_model",
        setup=_copy_finished,
    ),
    train("extend-unasked", "train.steps=4", workdir="{tmp}/run", needle="--extend continue", setup=_copy_finished),
    train("extend-fresh", "--extend", "continue", workdir="{tmp}/new", needle="has no checkpoint to extend"),
    train("extend-bogus", "--extend", "forever", needle="invalid choice: 'forever'"),
    train("resume-other-lr", "train.lr=1e-2", workdir="{tmp}/run", needle="train.lr", setup=_copy_finished),
    # ---- python -m asura.data.prepare
    prepare("no-args", needle="no source"),
    prepare("bad-builtin", "--builtin", "nope", "--output", "{tmp}/out", needle="--builtin='nope' is not valid"),
    prepare("unknown-flag", "--bogus", needle="unknown argument '--bogus'"),
    prepare("misspelt-flag", "--bulitin", "pydoc", "--output", "{tmp}/out", needle="did you mean --builtin?"),
    prepare("no-output", "--builtin", "pydoc", needle="no --output"),
    prepare(
        "binary-input",
        "--input",
        "{tmp}/a.bin",
        "--output",
        "{tmp}/out",
        needle="is not UTF-8 text",
        setup=_write_bytes("a.bin", bytes(range(128, 256)) * 40),
    ),
    prepare("input-matches-nothing", "--input", "{tmp}/*.txt", "--output", "{tmp}/out", needle="matches no files"),
    prepare(
        "output-is-file",
        "--builtin",
        "pydoc",
        "--output",
        "{tmp}/f",
        needle="is an existing file",
        setup=_write("f", "a file"),
    ),
    prepare(
        "output-holds-shards",
        "--input",
        "{root}/README.md",
        "--output",
        "{corpus}",
        needle="already holds prepared shards",
    ),
    prepare("tokenizer-bogus", "--builtin", "pydoc", "--output", "{tmp}/out", "--tokenizer", "gpt9", needle="gpt9"),
    prepare(
        "eval-fraction",
        "--builtin",
        "pydoc",
        "--output",
        "{tmp}/out",
        "--eval-fraction",
        "0.9",
        needle="--eval-fraction must be in (0, 0.5]",
    ),
    prepare(
        "docs-per-shard-word",
        "--builtin",
        "pydoc",
        "--output",
        "{tmp}/out",
        "--docs-per-shard",
        "abc",
        needle="--docs-per-shard",
    ),
    prepare(
        "jsonl-not-json",
        "--input",
        "{tmp}/c.jsonl",
        "--output",
        "{tmp}/out",
        needle="c.jsonl:2 is not JSON",
        setup=_write("c.jsonl", '{"text": "fine"}\n{"text": oops}\n'),
    ),
    # ---- python -m asura.sweep
    sweep("report-missing-dir", "report", "{tmp}/nope", needle="does not exist"),
    sweep("report-empty-dir", "report", "{tmp}", needle="has no trials"),
    sweep("report-no-dir", "report", needle="required"),
    sweep("spec-missing", "{tmp}/nope.yaml", needle="sweep spec not found"),
    sweep("spec-invalid-yaml", "{tmp}/s.yaml", needle="is not valid YAML", setup=_write("s.yaml", "base: [\n")),
    sweep(
        "spec-unknown-key",
        "{tmp}/s.yaml",
        needle="unknown key 'seed'; did you mean 'seeds'",
        setup=_write("s.yaml", SPEC + "seed: [0]\n"),
    ),
    sweep(
        "spec-duplicate-key",
        "{tmp}/s.yaml",
        needle="key 'seeds' is given twice",
        setup=_write("s.yaml", SPEC + "seeds: [0]\nseeds: [1]\n"),
    ),
    sweep(
        "spec-binary",
        "{tmp}/s.yaml",
        needle="is not UTF-8 text",
        setup=_write_bytes("s.yaml", bytes(range(256)) * 4),
    ),
    sweep("spec-no-base", "{tmp}/s.yaml", needle="missing `base:`", setup=_write("s.yaml", "seeds: [0]\n")),
    sweep(
        "spec-unknown-metric",
        "{tmp}/s.yaml",
        needle="metric='bogus' is not valid",
        setup=_write("s.yaml", SPEC + "metric: bogus\n"),
    ),
    sweep(
        "spec-bad-override-key",
        "{tmp}/s.yaml",
        needle="unknown config key 'model.d_modle'",
        setup=_write("s.yaml", "base: {demo}\noverrides: {model.d_modle: 3}\n"),
    ),
    sweep(
        "spec-invalid-trial",
        "{tmp}/s.yaml",
        needle="must divide model.d_model",
        setup=_write("s.yaml", SPEC + "axes: {model.n_heads: [3]}\n"),
    ),
    sweep("bad-flag", "{tmp}/s.yaml", "--bogus", needle="--bogus", setup=_write("s.yaml", SPEC)),
    sweep(
        "workers-zero", "{tmp}/s.yaml", "--workers", "0", needle="--workers must be >= 1", setup=_write("s.yaml", SPEC)
    ),
    sweep("no-args", needle="required"),
    sweep(
        "gs-workdir",
        "{tmp}/s.yaml",
        "--workdir",
        "gs://asura-bucket/sweep",
        needle="sweep and study dirs must be local",
        setup=_write("s.yaml", SPEC),
    ),
    sweep("report-gs-dir", "report", "gs://asura-bucket/sweep", needle="sweep and study dirs must be local"),
    train("workdir-other-scheme", workdir="s3://bucket/run", needle="the s3:// scheme is not supported"),
    # ---- python -m asura.flops
    flops("bad-override", "model.n_heads=3", needle="must divide model.d_model"),
    flops("unknown-key", "model.d_modle=3", needle="did you mean 'd_model'"),
    flops("override-without-equals", "model.d_model", needle="must look like section.key=value"),
    flops("missing-config", "--config", "{tmp}/missing.yaml", needle="config file not found"),
    flops("unknown-flag", "--bogus", needle="--bogus"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_in_one_line(case: Case, env: Env, capsys, compile_events):
    _check(case, env, capsys, compile_events)


def test_the_table_is_large_and_its_ids_unique():
    ids = [p.id for p in CASES] + [p.id for p in SUBPROCESS_CASES]
    assert len(ids) >= 90 and len(set(ids)) == len(ids)


# ------------------------------------------------------------------ real entry points


def _sub_env(extra: dict[str, str]) -> dict:
    """This process's environment, the repo on PYTHONPATH, `extra` set (XLA_FLAGS appended to).
    JAX_PLATFORMS=cpu unless set: where libtpu is installed without a TPU (CI's tpu extra), its start-up
    notices go to stderr at random (as in test_train_resume.py); they are not the CLI's lines."""
    env = {"JAX_PLATFORMS": "cpu", **os.environ}
    for key, val in extra.items():
        env[key] = " ".join(x for x in (env.get(key, ""), val) if x) if key == "XLA_FLAGS" else val
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


ENTRY = {
    "train": [str(ROOT / "train.py")],
    "prepare": ["-m", "asura.data.prepare"],
    "sweep": ["-m", "asura.sweep"],
    "flops": ["-m", "asura.flops"],
}


def sub(id: str, case, **extra_env: str):
    """A row like those of CASES, run as a real subprocess (with extra environment variables)."""
    (inner,) = case.values
    return pytest.param(inner, extra_env, id=f"subprocess-{id}")


ONE_CPU = {"JAX_PLATFORMS": "cpu"}  # rows whose message depends on the device count


SUBPROCESS_CASES = [
    sub("unknown-flag", train("x", "--bogus", needle="--bogus")),
    sub("bad-registry-value", train("x", "model.attention=bogus", needle="model.attention='bogus' is not valid")),
    sub("lr-nan", train("x", "train.lr=.nan", needle="train.lr must be a finite number")),
    sub("override-unclosed-list", train("x", "model.adapter_targets=[q,v", needle="the value is not valid YAML")),
    sub("workdir-empty", train("x", workdir="", needle="--workdir is empty")),
    sub("mesh-too-big", train("x", "mesh.data=4", needle="needs 4 devices but 1 are available"), **ONE_CPU),
    sub(
        "batch-not-dividing-data-axis",
        train("x", "train.batch_size=7", needle="train.batch_size=7 must be divisible by mesh data x fsdp (2)"),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    ),
    sub("memory", train("x", "--config", "{demo}", "data.seq_len=65536", tiny=False, needle="GiB per device")),
    sub("workdir-locked", train("x", needle="is in use by another trainer", setup=_lock_finished)),
    sub("prepare-no-args", prepare("x", needle="no source")),
    sub("sweep-report-missing", sweep("x", "report", "{tmp}/nope", needle="does not exist")),
    sub("flops-missing-config", flops("x", "--config", "{tmp}/missing.yaml", needle="config file not found")),
]


@pytest.mark.parametrize(("case", "extra_env"), SUBPROCESS_CASES)
def test_real_entry_point_refuses_the_same_way(case: Case, extra_env: dict[str, str], env: Env):
    argv = [sys.executable, *ENTRY[case.cli], *(env.fill(a) for a in case.argv)]
    held = case.setup(env) if case.setup is not None else None
    with held or contextlib.nullcontext():
        before = snapshot(env.wd, env.corpus, env.tmp)
        t0 = time.perf_counter()
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_sub_env(extra_env),
            cwd=env.tmp,
            timeout=10 * SUBPROCESS_LIMIT_S,
            check=False,
        )
        wall = time.perf_counter() - t0
        after = snapshot(env.wd, env.corpus, env.tmp)
    found = _problems(p.returncode, p.stdout, p.stderr, env.fill(case.needle), before, after)
    if wall >= SUBPROCESS_LIMIT_S:
        found.append(f"(e) took {wall:.1f}s >= {SUBPROCESS_LIMIT_S}s: compiled before refusing?")
    assert not found, _report(found, p.returncode, p.stdout, p.stderr)
