"""Compiling for a TPU this machine does not have: the Mosaic kernels and `python -m asura.aot`.

test_kernels_lowering.py stops at the lowered module; here libtpu's compiler takes it on to TPU
code (so a kernel that lowers but cannot compile, e.g. blocks over the VMEM budget, fails here).
Needs libtpu (the optional `tpu` extra, which CI installs); without it those tests skip. Every
compile runs in a fresh process with asura.aot's worker environment, as the CLI does: libtpu
aborts the process on some programs, and a pytest worker may already hold a CPU-only backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

from asura import aot

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (optional extra: pip install -e '.[tpu]'; CI installs it)",
)
TINY = ROOT / "configs" / "presets" / "looped_tiny.yaml"


def _aot(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asura.aot", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------ the kernels alone

KERNEL_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from asura import aot
    from asura.kernels import flash_tpu
    from asura.kernels.lowering import kernel_calls

    B, T, N, K, H = 1, 256, 2, 1, 128
    devices = aot.topology_devices(aot.parse_topology("v5e:1x1"))
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))

    def compile_grad(T, dtype, **blocks):
        def f(q, k, v, seg):
            o = lambda q, k, v: flash_tpu.flash_attention(q, k, v, segment_ids_BT=seg, causal=True, interpret=False,
                                                          **blocks)
            return jax.grad(lambda q, k, v: o(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
        args = [sds((B, T, N, H), dtype), sds((B, T, K, H), dtype), sds((B, T, K, H), dtype), sds((B, T), jnp.int32)]
        with jax.set_mesh(mesh):
            lowered = jax.jit(f).trace(*args).lower()
        calls = sorted(kernel_calls(lowered, "tpu"))
        try:
            text = lowered.compile().as_text()
        except jax.errors.JaxRuntimeError as e:
            return {"calls": calls, "error": str(e).splitlines()[0][:300]}
        return {"calls": calls, "compiled": text.count('custom_call_target="tpu_custom_call"')}

    out = {
        "device_kind": devices[0].device_kind,
        "small": compile_grad(256, jnp.bfloat16),
        # fp32 blocks of 2048 x 2048 overflow v5e's scoped VMEM (1024 x 1024 compile): lowers, cannot compile
        "vmem": compile_grad(2048, jnp.float32, block_q=2048, block_k=2048),
    }
    json.dump(out, open(sys.argv[1], "w"))
    """
)


@needs_libtpu
def test_flash_kernels_compile_for_a_v5e(tmp_path):
    """Forward, dq and dk/dv kernels through libtpu's compiler; oversized blocks fail in compile, not before."""
    script, result = tmp_path / "worker.py", tmp_path / "out.json"
    script.write_text(KERNEL_WORKER)
    p = subprocess.run(
        [sys.executable, str(script), str(result)],
        capture_output=True,
        text=True,
        timeout=600,
        env=aot.worker_env(),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["device_kind"] == "TPU v5 lite"
    kernels = ["flash_dkdv_tpu", "flash_dq_tpu", "flash_fwd_tpu"]
    assert out["small"] == {"calls": kernels, "compiled": 3}
    # The compiler, not the lowering, refuses what the chip cannot hold: proof that compile() ran Mosaic.
    assert out["vmem"]["calls"] == kernels
    assert "vmem" in out["vmem"].get("error", "").lower(), out["vmem"]


# ------------------------------------------------------------------ python -m asura.aot


@needs_libtpu
def test_tiny_train_step_compiles_on_a_v5e_slice(tmp_path):
    """The 2-layer looped model, Pallas attention, batch sharded over 4 chips: fits, kernels counted."""
    out = tmp_path / "r.json"
    p = _aot("--config", str(TINY), "--topology", "v5e:2x2", "model.attention=pallas", "data.seq_len=256",
             "train.batch_size=8", "--json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    mem = r["memory"]
    assert 0 < mem["peak"] < 16 * aot.GIB and mem["arguments"] > 0 and mem["code"] > 0
    # 2 layers: one forward kernel per layer plus the guidance/depth forward reruns; one dq and dkdv per layer
    assert r["kernels"]["flash_dq_tpu"] == r["kernels"]["flash_dkdv_tpu"] == 2
    assert r["compiled_kernel_calls"] == sum(r["kernels"].values())
    # the while driver's per-step buffers reach the TPU uninitialised, none copied (a copy would
    # cost what the CPU's zero-fill costs: bench/RESULTS.md, skipped iterations)
    assert r["loop_buffers"]["uninitialised"] > 0 and r["loop_buffers"]["copied"] == 0
    assert "peak" in p.stdout and "fits" in p.stdout and "flash_fwd_tpu" in p.stdout
    assert p.stderr.strip() == ""


@pytest.mark.slow
@needs_libtpu
def test_a_run_that_switches_to_halting_compiles_both_of_its_programs(tmp_path):
    """depth.halt_from > 0: the step under halting (its own program, with each layer's copied keys and
    values in the loop) is compiled up front too, not first met at step halt_from on the chips."""
    out = tmp_path / "r.json"
    p = _aot("--config", str(TINY), "--topology", "v5e:2x2", "model.guidance=none", "model.exit_gate=true",
             "depth.halt_rule=gate", "depth.halt_threshold=0.5", "depth.halt_from=1", "depth.bptt_k=0",
             "train.batch_size=8", "--json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["halting_phase"]["status"] == "ok"
    assert r["memory"]["peak"] > 0 and r["halting_phase"]["memory"]["peak"] > 0
    assert "halting_phase" not in r["halting_phase"]


@needs_libtpu
def test_out_of_memory_is_one_line_naming_the_shortfall_and_the_fix():
    p = _aot("--config", str(TINY), "--topology", "v5e:1x1", "train.batch_size=4096", "data.seq_len=256",
             "model.remat=none")  # fmt: skip
    assert p.returncode == 1, p.stderr[-3000:]
    (line,) = _lines(p.stderr)
    assert line.startswith("asura.aot: error: looped_tiny does not fit on v5e:1x1 at batch 4096"), line
    assert "remat none" in line, line
    assert "GiB of HBM per chip, TPU v5 lite has 15.75 (short" in line, line
    for fix in ("train.batch_size=", "train.grad_accum=", "model.remat=block"):
        assert fix in line, line


@needs_libtpu
def test_topology_libtpu_rejects_is_bad_input():
    p = _aot("--config", str(TINY), "--topology", "v5e:3x7", "train.batch_size=21", timeout=120)
    assert p.returncode == 2, p.stderr
    (line,) = _lines(p.stderr)
    assert line.startswith("asura.aot: error: --topology v5e:3x7:") and "not divisible" in line, line


@needs_libtpu
@pytest.mark.slow
def test_looped_350m_fits_a_v5e_4x4_at_batch_32(tmp_path):
    """The preset itself (minutes of compile on 2 cores, 2-6 GB of RSS)."""
    out = tmp_path / "r.json"
    p = _aot("--config", str(ROOT / "configs/presets/looped_350m.yaml"), "--topology", "v5e:4x4",
             "model.attention=pallas", "train.batch_size=32", "--json", str(out), timeout=1800)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["memory"]["peak"] < 16 * aot.GIB
    assert r["kernels"]["flash_dq_tpu"] == 13  # one per layer of the shared stack


# ------------------------------------------------------------------ no libtpu needed


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--topology", "v9z:2x2"], "unknown TPU generation 'v9z'; choose one of v4, v5e, v5p, v6e"),
        (["--topology", "v5p:4x4"], "a v5p topology has 3 dimensions, e.g. v5p:4x4x4"),
        (["--topology", "v5e:4x4", "train.batch_size=8"], "train.batch_size=8 must be divisible by mesh data x fsdp"),
        (["--topology", "v5e:2x2", "mesh.data=8"], "needs 8 devices but 4 are available"),
        (["--topology", "v5e:2x2", "model.atention=pallas"], "model.atention"),
        ([], "--topology"),
        (["--topology", "v5e:2x2", "--slices", "2"], "the 8 devices span 2 slices: set mesh.dcn sizes"),
        (["--topology", "v5e:2x2", "--slices", "0"], "--slices 0: a run spans at least 1 slice"),
        (
            ["--topology", "v5e:2x2", "--slices", "2", "mesh.dcn.data=2", "train.batch_size=4"],
            "train.batch_size=4 must be divisible by mesh data x fsdp (8) x train.grad_accum (1) on 8 device(s)",
        ),
        (["--topology", "v5e:2x2", "--slices", "2", "mesh.dcn.data=4"], "spans 4 slices but the devices form 2"),
    ],
    ids=[
        "generation",
        "dims",
        "batch-split",
        "mesh",
        "config-key",
        "missing-topology",
        "slices-no-dcn",
        "slices-zero",
        "slices-batch",
        "slices-dcn",
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        aot.main(["--config", str(TINY), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = _lines(err)
    assert line.startswith("asura.aot: error: ") and needle in line, line


def test_without_libtpu_the_cli_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        aot.main(["--config", str(TINY), "--topology", "v5e:2x2"])
    assert e.value.code == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line == "asura.aot: error: compiling for a TPU needs libtpu: pip install -e '.[tpu]' (a 215 MB wheel)"


def test_oom_message_parsing():
    msg = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for "
        "HLO temporaries (31.13G) exceeds available HBM (15.75G). HLO module: jit_wrapped.\nmore detail"
    )
    r = aot.parse_oom(msg)
    assert r["need"] == pytest.approx(31.13 * aot.GIB) and r["have"] == pytest.approx(15.75 * aot.GIB)
    assert r["message"].startswith("RESOURCE_EXHAUSTED") and "\n" not in r["message"]
    assert aot.parse_oom("RESOURCE_EXHAUSTED: something else")["need"] is None


def test_a_compiler_crash_is_one_line(tmp_path, monkeypatch, capsys):
    """libtpu's CHECK failures abort the worker (SIGABRT): the parent reports the fatal line and the log."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'W0000 noise'\n"
        "echo 'F1130 fusion_util.cc:5151] Check failed: window.pad_low[old_dim] == 0' >&2\n"
        "echo '*** Check failure stack trace: ***' >&2\necho '    @  0x7f00 (unknown)' >&2\nkill -ABRT $$\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(aot.sys, "executable", str(fake))
    monkeypatch.setattr(aot, "libtpu_available", lambda: True)
    code = aot.main(["--config", str(TINY), "--topology", "v5e:1x1", "train.batch_size=8"])
    assert code == 3
    (line,) = _lines(capsys.readouterr().err)
    assert "the TPU compiler crashed (signal SIGABRT): F1130 fusion_util.cc:5151] Check failed" in line, line
    log = line.rsplit("(log: ", 1)[1].rstrip(")")
    text = Path(log).read_text()
    os.unlink(log)
    assert "W0000 noise" in text


def test_a_compile_past_the_timeout_is_one_line(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(aot.sys, "executable", str(fake))
    monkeypatch.setattr(aot, "libtpu_available", lambda: True)
    code = aot.main(["--config", str(TINY), "--topology", "v5e:1x1", "train.batch_size=8", "--timeout", "1"])
    assert code == 3
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("asura.aot: error: the compile did not finish in 1 s (log: "), line
    os.unlink(line.rsplit("(log: ", 1)[1].rstrip(")"))
