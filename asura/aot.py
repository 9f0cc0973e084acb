"""Compile the real train step for a TPU this machine does not have, and read its memory.

    python -m asura.aot --config configs/presets/looped_350m.yaml --topology v5e:4x4 \\
        model.attention=pallas train.batch_size=32 [--json out.json] [--timeout S]

MaxText's ``train_compile.py`` idea: libtpu (the optional ``tpu`` extra) describes a TPU
slice as abstract devices, and XLA's TPU compiler runs here on the CPU. Data flow::

    parent (no JAX backend): parse config + topology name, check mesh and batch split (exit 2)
      -> worker subprocess: python -m asura.aot --worker-result R.json <same argv>
           libtpu topology -> abstract devices -> make_mesh(cfg.mesh) -> MeshPlacement
           -> abstract_state + make_train_step, jitted by placement.jit_step (what the Trainer runs)
           -> .trace(ShapeDtypeStructs carrying the placement's shardings).lower().compile()
           -> R.json: per-chip memory_analysis, lower/compile seconds, Mosaic kernels, or the OOM
      <- parent prints the report; a worker killed by a signal becomes one line naming its log
         (libtpu 0.0.50 aborts with `fusion_util.cc ... split of a padded window dim` on some
         programs: seen with Pallas attention + an adapter + >= ~8 rows per chip on v5e/v5p).

Invariants a contributor must keep:
* The compiled program is the one train.py runs: same step function, same jit (state
  donation, logical-rule context), same shardings, no extra compiler options. The only
  addition is ``jax.set_mesh`` around lowering, which tells the Pallas dispatch which chip
  it lowers for (a real TPU host needs no hint); it does not change the program.
* Every compile runs in its own process: libtpu's CHECK failures abort the process
  (SIGABRT), which no ``except`` can catch.
* Nothing is allocated: inputs are ShapeDtypeStructs, devices are abstract.

Exit codes: 0 compiled and fits; 1 does not fit (compile-time HBM OOM, or peak over the
chip's HBM); 2 bad input (config, topology, mesh, libtpu missing); 3 the compiler crashed,
failed otherwise, or ran past --timeout. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from asura.chips import CHIPS, Chip, tpu_generations
from asura.config import Config
from asura.config.cli import fail, parse_config_args

PROG = "asura.aot"
GIB = 1 << 30


HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host; smaller slices (1x1, 2x1) need their own


@dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5e:4x4": one slice
    chip: Chip
    shape: tuple[int, ...]
    slices: int = 1  # identical slices joined by the data-center network (TPU multislice)

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def label(self) -> str:
        return self.name if self.slices == 1 else f"{self.slices} x {self.name}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        full = (*self.shape, 1, 1)[:3]
        return tuple(min(a, b) for a, b in zip(full, HOST_BOUNDS))  # type: ignore[return-value]


def parse_topology(name: str, slices: int = 1) -> Topology:
    """'v5e:4x4' -> Topology; ValueError (one line) for an unknown generation, a malformed shape or
    a slice count below 1."""
    gen, _, dims = name.partition(":")
    tpus = tpu_generations()
    if gen not in tpus:
        raise ValueError(f"--topology {name!r}: unknown TPU generation {gen!r}; choose one of {', '.join(tpus)}")
    chip = CHIPS[gen]
    example = "x".join(["4"] * chip.torus_dims)
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", dims) or dims.count("x") + 1 != chip.torus_dims:
        raise ValueError(
            f"--topology {name!r}: a {gen} topology has {chip.torus_dims} dimensions, e.g. {gen}:{example}"
        )
    if slices < 1:
        raise ValueError(f"--slices {slices}: a run spans at least 1 slice")
    return Topology(name, chip, tuple(int(d) for d in dims.split("x")), slices)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None or os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))


def worker_env() -> dict[str, str]:
    """The worker's environment: the host's CPU backend for JAX itself; libtpu only as a compiler.

    ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile, so a second compile
    (or any JAX process of a venv with libtpu) running at the same time fails to load it; nothing
    here touches a real TPU, so the lock protects nothing.
    """
    return {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------------------- the compile (worker side)


def topology_devices(topo: Topology):
    """The slice's abstract devices (libtpu)."""
    from jax.experimental import topologies

    kw = {"num_slices": topo.slices} if topo.slices > 1 else {}  # libtpu: identical slices over DCN
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.name,
        chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.host_bounds,
        **kw,
    )
    return desc.devices


def train_step_inputs(cfg: Config, built, placement):
    """(state, batch, n) as ShapeDtypeStructs with the shardings train.py places them with."""
    import jax
    import jax.numpy as jnp

    from asura.data.synthetic import synthetic_batch  # every data source yields these fields and dtypes
    from asura.parallel.mesh import batch_sharding

    state = placement.abstract(built.state)
    shapes = jax.eval_shape(lambda: synthetic_batch(cfg, 0))
    batch = {
        k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding(placement.mesh, placement.rules, s.ndim))
        for k, s in shapes.items()
    }
    n = jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated)
    return state, batch, n


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (its shard of each leaf)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


MEMORY_FIELDS = {  # report name -> CompiledMemoryStats field (per chip)
    "arguments": "argument_size_in_bytes",
    "outputs": "output_size_in_bytes",
    "aliased": "alias_size_in_bytes",
    "temporaries": "temp_size_in_bytes",
    "code": "generated_code_size_in_bytes",
    "peak": "peak_memory_in_bytes",
}


def compile_train_step(cfg: Config, devices, halting: bool | None = None) -> dict:
    """Lower and compile train.py's step for the slice `devices`; a JSON-able result (see `report`).
    A run that switches to training under halting (depth.halt_from > 0) runs a second program from
    then on: it is compiled too, and its result is kept under "halting_phase" (its status counts)."""
    import collections

    import jax

    from asura.flops import flop_count
    from asura.hlo import uninitialised_buffers
    from asura.kernels.lowering import kernel_calls
    from asura.parallel.mesh import dcn_span, granules, make_mesh
    from asura.parallel.placement import MeshPlacement
    from asura.train.state import abstract_state
    from asura.train.step import halting_at, make_train_step

    if halting is None and halting_at(cfg, 0) != halting_at(cfg, cfg.train.steps - 1):
        first, later = compile_train_step(cfg, devices, False), compile_train_step(cfg, devices, True)
        status = first["status"] if first["status"] != "ok" else later["status"]
        return {**first, "status": status, "halting_phase": later}
    mesh = make_mesh(cfg.mesh, devices)
    built = abstract_state(cfg)
    placement = MeshPlacement(cfg, built.axes, mesh=mesh)
    state, batch, n = train_step_inputs(cfg, built, placement)
    step = placement.jit_step(make_train_step(cfg, built.graphdef, built.rest, built.axes, halting=halting))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # the Pallas dispatch reads the target chip from the context
        lowered = step.trace(state, batch, n).lower()
    t1 = time.perf_counter()
    out = {
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "lower_s": t1 - t0,
        "kernels": dict(sorted(collections.Counter(kernel_calls(lowered, "tpu")).items())),
        "state_bytes": per_chip_bytes(state),  # params + optimiser state + counters, as placed
        "param_bytes": per_chip_bytes(state["params"]),  # the gradients take as much again
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA reports an HBM overflow as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**out, "status": "oom", "compile_s": time.perf_counter() - t1, **parse_oom(str(e))}
    out["compile_s"] = time.perf_counter() - t1
    stats = compiled.memory_analysis()
    out["memory"] = {k: getattr(stats, f, None) for k, f in MEMORY_FIELDS.items()}
    text = compiled.as_text()
    out["slices"] = granules(devices, dcn_span(cfg.mesh))[0]
    out.update(read_collectives(cfg, text, out["slices"]))
    out["train_flops_per_chip"] = flop_count(cfg).train * cfg.train.batch_size * cfg.data.seq_len / len(devices)
    out["compiled_kernel_calls"] = text.count('custom_call_target="tpu_custom_call"')
    out["loop_buffers"] = dataclasses.asdict(uninitialised_buffers(text))
    return {**out, "status": "ok"}


def collective_bytes(cfg: Config, hlo: str, slices: int) -> dict:
    """Per chip per step, by network (ICI inside a slice, DCN across slices): the collectives'
    count, payload and bytes sent under a ring algorithm (asura.hlo.collectives). The depth loop's
    trip count is traced, so its collectives are counted at the expected depth (forward and backward
    alike: depth.bptt_k's shorter backward is not taken off)."""
    from asura.depth import expected_depth
    from asura.hlo import collectives

    trips = expected_depth(cfg)
    out: dict = {"loop_trips": trips}
    found = collectives(hlo, slices, trips)
    for net in ("ici", "dcn"):
        mine = [c for c in found if c.network == net]
        by_op: dict[str, float] = {}
        for c in mine:
            by_op[c.op] = by_op.get(c.op, 0.0) + c.sent * c.runs
        out[net] = {
            "ops": len(mine),
            "runs": sum(c.runs for c in mine),
            "payload": sum(c.payload * c.runs for c in mine),
            "payload_once": sum(c.payload for c in mine),  # each op counted once, whatever its loop
            "sent": sum(c.sent * c.runs for c in mine),
            "sent_by_op": dict(sorted(by_op.items())),
            "sent_in_loops": sum(c.sent * c.runs for c in mine if c.in_loop),
        }
    return out


def read_collectives(cfg: Config, hlo: str, slices: int) -> dict:
    """{"collectives": collective_bytes(...)}, or None and "collectives_error" (one line) for a
    program the HLO reader cannot read: the rest of the compile's report is kept."""
    try:
        return {"collectives": collective_bytes(cfg, hlo, slices)}
    except ValueError as e:
        return {"collectives": None, "collectives_error": _first_line(e)}


def roofline(chip: Chip, res: dict) -> dict[str, float | None]:
    """Lower bounds on one step's time, seconds (an estimate): compute at the chip's peak bf16 FLOP/s,
    ICI bytes at half the bidirectional bandwidth (one direction), DCN bytes at the per-chip DCN rate.
    None where the chip table has no published bandwidth."""
    col = res["collectives"]
    return {
        "compute_s": res["train_flops_per_chip"] / chip.peak_bf16_flops,
        "ici_s": col["ici"]["sent"] / (chip.ici_GBps * 1e9 / 2) if chip.ici_GBps else None,
        "dcn_s": col["dcn"]["sent"] / (chip.dcn_Gbps * 1e9 / 8) if chip.dcn_Gbps else None,
    }


_OOM_SIZES = re.compile(r"\(([\d.]+)([KMGT]?)\)? exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom(message: str) -> dict:
    """{'need': bytes|None, 'have': bytes|None, 'message': first line} from XLA's CompileTimeHbmOom text."""
    m = _OOM_SIZES.search(message)
    line = next((ln.strip() for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message.splitlines()[0])
    if not m:
        return {"need": None, "have": None, "message": line[:300]}
    need = float(m.group(1)) * _UNIT[m.group(2)]
    have = float(m.group(3)) * _UNIT[m.group(4)]
    return {"need": need, "have": have, "message": line[:300]}


def _worker(cfg: Config, topo: Topology, result: Path) -> None:
    """Run the compile and write its result. A Python bug is left to raise (traceback in the log)."""
    import jax

    from asura.parallel.mesh import MeshError

    try:
        devices = topology_devices(topo)
    except (jax.errors.JaxRuntimeError, RuntimeError) as e:  # libtpu rejects the name, or is missing
        res = {"status": "bad_input", "message": f"--topology {topo.name}: {_first_line(e)}"}
    else:
        try:
            res = compile_train_step(cfg, devices)
        except MeshError as e:
            res = {"status": "bad_input", "message": _first_line(e)}
        except (jax.errors.JaxRuntimeError, ValueError, NotImplementedError) as e:  # lowering or compiler refused
            res = {"status": "error", "message": f"{type(e).__name__}: {_first_line(e)}"}
    result.write_text(json.dumps(res))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------------- the report (parent side)


def suggestions(cfg: Config, topo: Topology, res: dict, need: float, have: float) -> list[str]:
    """What to change so one chip needs `need` -> under `have` bytes: batch, grad_accum, remat, fsdp.

    The parameters, their gradients and the Adam state (`fixed`) do not shrink with the batch;
    the rest (activations, mostly) scales with the microbatch rows per chip.
    """
    from asura.parallel.mesh import batch_split, mesh_levels

    t, levels = cfg.train, mesh_levels(cfg.mesh, topo.chips, topo.slices)
    rows = batch_split(cfg.mesh.rules, levels.sizes)
    fixed = res.get("state_bytes", 0) + res.get("param_bytes", 0)
    out = []
    if fixed < 0.9 * have:
        k = 2 ** max(1, math.ceil(math.log2(max(need - fixed, 1) / (have - fixed))))
        smaller = t.batch_size // k // rows * rows
        if smaller >= rows:
            out.append(f"train.batch_size={smaller}")
        accum = t.grad_accum * k
        while accum > t.grad_accum and t.batch_size % (rows * accum):
            accum //= 2
        if accum > t.grad_accum:
            out.append(f"train.grad_accum={accum}")
        if cfg.model.remat == "none":
            out.append("model.remat=block")
    if levels.ici["fsdp"] < topo.chips_per_slice and fixed > 0.25 * have:  # fsdp within a slice: gathers on ICI
        out.append(
            f"mesh.fsdp={topo.chips_per_slice} mesh.data=1 (params, grads and Adam state take {_gib(fixed)} GiB/chip)"
        )
    elif fixed >= 0.9 * have:
        out.append(f"more chips with mesh.fsdp (params, grads and Adam state alone take {_gib(fixed)} GiB/chip)")
    return out


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def oom_line(cfg: Config, topo: Topology, res: dict) -> str:
    """The one line for a compile-time HBM overflow: the shortfall and what to change."""
    t = cfg.train
    need, have = res.get("need"), res.get("have") or topo.chip.hbm_gib * GIB
    short = (
        f"needs {_gib(need)} GiB of HBM per chip, {topo.chip.device_kind} has {_gib(have)} (short {_gib(need - have)})"
        if need
        else res["message"]
    )
    fix = "; ".join(suggestions(cfg, topo, res, need or 2 * have, have)) or "a larger topology"
    return (
        f"{cfg.name} does not fit on {topo.name} at batch {t.batch_size} ({t.batch_size / topo.chips:g} rows/chip, "
        f"grad_accum {t.grad_accum}, remat {cfg.model.remat}): {short}; try {fix}"
    )


def report(cfg: Config, topo: Topology, res: dict) -> tuple[list[str], bool]:
    """(stdout lines, fits) for a compiled result."""
    t, mem = cfg.train, res["memory"]
    cap, peak = topo.chip.hbm_gib * GIB, res["memory"].get("peak")
    fits = peak is not None and peak <= cap
    kernels = ", ".join(f"{k} x{v}" for k, v in res["kernels"].items()) or "none"
    lines = [
        f"{cfg.name} on {topo.label}: {topo.chips} x {res['device_kind']} ({topo.chip.hbm_gib:g} GiB HBM each), "
        f"mesh {res['mesh']}",
        f"batch {t.batch_size} x {cfg.data.seq_len} ({t.batch_size / topo.chips:g} rows/chip), grad_accum "
        f"{t.grad_accum}, remat {cfg.model.remat}, attention {cfg.model.attention}",
        f"compile: lower {res['lower_s']:.1f} s, compile {res['compile_s']:.1f} s",
        "per-chip HBM, GiB:",
        *(f"  {key:<12}{_gib(mem.get(key)):>8}" for key in MEMORY_FIELDS),
        f"  {'capacity':<12}{topo.chip.hbm_gib:>8.2f}  peak = {100 * (peak or 0) / cap:.0f}% of HBM: "
        + ("fits" if fits else "DOES NOT FIT"),
        f"Mosaic kernels (lowered): {kernels}; tpu_custom_call in the compiled HLO: {res['compiled_kernel_calls']}",
    ]
    if (buf := res.get("loop_buffers")) is not None:  # the while driver's S-row buffers
        lines.append(f"loop buffers: {buf['uninitialised']} uninitialised (AllocateBuffer), {buf['copied']} copied")
    if res.get("collectives") is not None:
        lines += collective_lines(topo, res)
    elif res.get("collectives_error"):
        lines.append(f"collectives: not read ({res['collectives_error']})")
    if not fits:
        fix = "; ".join(suggestions(cfg, topo, res, peak or 2 * cap, cap))
        lines.append(f"peak {_gib(peak)} GiB is over the chip's {topo.chip.hbm_gib:g} GiB; try {fix}")
    return lines, fits


def _mib(x: float) -> str:
    return f"{x / (1 << 20):.2f} MiB"


def collective_lines(topo: Topology, res: dict) -> list[str]:
    """The collective bytes by network and the roofline they imply (report lines)."""
    col, chip = res["collectives"], topo.chip
    lines = [f"collectives per chip per step (ring estimate; depth loop at {col['loop_trips']:g} iterations):"]
    for net, what in (("ici", "ICI (inside a slice)"), ("dcn", "DCN (across slices)")):
        c = col[net]
        ops = ", ".join(f"{op} {_mib(b)}" for op, b in c["sent_by_op"].items()) or "none"
        lines.append(
            f"  {what:<21} sent {_mib(c['sent']):>12} ({_mib(c['sent_in_loops'])} inside loops) in {c['runs']:g} "
            f"runs of {c['ops']} ops: {ops}"
        )
    roof = roofline(chip, res)
    fmt = lambda x, bw: "unknown (no published bandwidth)" if x is None else f">= {1e3 * x:.3g} ms at {bw}"
    lines += [
        f"step-time lower bounds (estimate, {chip.source}):",
        f"  compute {1e3 * roof['compute_s']:.3g} ms at {chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16 peak",
        f"  ICI     {fmt(roof['ici_s'], f'{chip.ici_GBps:g} GB/s bidirectional / 2' if chip.ici_GBps else '')}",
        f"  DCN     {fmt(roof['dcn_s'], f'{chip.dcn_Gbps:g} Gbit/s per chip' if chip.dcn_Gbps else '')}",
    ]
    return lines


def _crash_line(log_text: str) -> str:
    """libtpu's fatal line (glog 'F...' / 'Check failed'), else the last non-empty line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in lines:
        if re.match(r"F\d{4} ", ln) or "Check failed" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def run_worker(argv: list[str], timeout: float | None) -> tuple[dict | None, int | None, str]:
    """Run the compile in a fresh process: (result or None, returncode or None on timeout, its log's path)."""
    fd, log_path = tempfile.mkstemp(prefix="asura-aot-", suffix=".log")
    result = Path(log_path).with_suffix(".json")
    cmd = [sys.executable, "-m", "asura.aot", "--worker-result", str(result), *argv]  # --json is the parent's
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env())
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        except KeyboardInterrupt:
            proc.kill()
            raise
    res = json.loads(result.read_text()) if result.is_file() else None
    result.unlink(missing_ok=True)
    return res, rc, log_path


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:4x4, v5p:4x4x4, v6e:2x2")
    parser.add_argument(
        "--slices", type=int, default=1, help="identical slices over the data-center network (needs mesh.dcn.*)"
    )
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--timeout", type=float, default=0, help="give up on the compile after S seconds (0: never)")
    parser.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_config_args(argv, PROG, "Compile the train step for a TPU topology; print per-chip HBM.", _args)
    try:
        topo = parse_topology(args.topology, args.slices)
    except ValueError as e:
        fail(str(e), PROG)
    from asura.parallel.mesh import MeshError
    from asura.train.preflight import PreflightError, check_devices

    try:
        check_devices(cfg, topo.chips, slices=topo.slices)
    except (MeshError, PreflightError) as e:
        fail(f"{str(e).splitlines()[0]} ({topo.label})", PROG)
    if args.worker_result:
        _worker(cfg, topo, Path(args.worker_result))
        return 0
    if not libtpu_available():
        fail("compiling for a TPU needs libtpu: pip install -e '.[tpu]' (a 215 MB wheel)", PROG)

    print(f"compiling the train step of {cfg.name} for {topo.label} ({topo.chips} chips)...", flush=True)
    res, rc, log_path = run_worker(argv, args.timeout or None)
    if res is None:  # the worker died before writing a result: a libtpu abort, or --timeout
        if rc is None:
            line = f"the compile did not finish in {args.timeout:g} s (log: {log_path})"
        else:
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
            line = f"the TPU compiler crashed ({how}): {_crash_line(Path(log_path).read_text(errors='replace'))}"
            line += f" (log: {log_path})"
        _write_json(args.json, cfg, topo, {"status": "crash", "message": line})
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 3
    _write_json(args.json, cfg, topo, res)
    if res["status"] == "error":  # the log keeps libtpu's own account
        print(f"{PROG}: error: compiling for {topo.name} failed: {res['message']} (log: {log_path})", file=sys.stderr)
        return 3
    Path(log_path).unlink(missing_ok=True)
    if res["status"] == "bad_input":
        fail(res["message"], PROG)
    if res["status"] == "oom":
        print(f"{PROG}: error: {oom_line(cfg, topo, res)} (compile {res['compile_s']:.0f} s)", file=sys.stderr)
        return 1
    lines, fits = report(cfg, topo, res)
    print("\n".join(lines))
    return 0 if fits else 1


def _write_json(path: str | None, cfg: Config, topo: Topology, res: dict) -> None:
    if not path:
        return
    t = cfg.train
    meta = {
        "config": cfg.name,
        "topology": topo.name,
        "slices": topo.slices,
        "chips": topo.chips,
        "hbm_gib": topo.chip.hbm_gib,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": cfg.data.seq_len,
        "remat": cfg.model.remat,
        "attention": cfg.model.attention,
        "n_layers": cfg.model.n_layers,
    }
    Path(path).write_text(json.dumps({**meta, **res}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
