"""Compile the GPU flash kernels ahead of time for an H100 (sm_90a), on any machine, and report resources.

    pip install triton==3.6.0            # the GPU image's Triton; compiling needs no GPU
    python bench/triton_aot.py --H 64,128 --T 4096 --heads 16
    python bench/triton_aot.py --defaults-only   # just the tuned-defaults table

For each head dim and tile candidate (block_q, block_k) the script lowers forward + backward through
Pallas for an abstract H100 (asura.kernels.lowering), takes each kernel's Triton IR (forward, dq,
dk/dv) through Triton's own pipeline to PTX for every (num_warps, num_stages), and runs the bundled
ptxas -v on it. Per kernel it prints shared memory, registers per thread, spill bytes, whether the
dots became Hopper wgmma instructions, and whether it fits (shared memory <= 227 KiB, no spills).

What this is and is not: it proves the kernels compile for Hopper and rules out tiles that cannot
run or that spill; it says nothing about speed. Timings need the GPU (bench/attention.py). jax's
own XLA:GPU runs its bundled Triton, not this pip one, so the numbers are a close proxy, not the
exact binary. The Triton IR is captured by wrapping a private jax lowering function; if a jax
upgrade moves it the script says so instead of printing a wrong table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from asura.kernels import flash_gpu
from asura.kernels import lowering as L

SMEM_LIMIT = 227 * 1024  # H100 max dynamic shared memory per block
KERNELS = ("fwd", "dq", "dkdv")


@contextlib.contextmanager
def _capture_triton_ir():
    """Collect (kernel name, Triton MLIR text) for every pallas_call lowered inside the block."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg

        orig = reg.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"this jax ({jax.__version__}) moved the Pallas-Triton lowering hook: {e}") from None
    found: list[tuple[str, str]] = []

    def wrapped(*args, **kwargs):
        result = orig(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        found.append((re.search(r"module @(\w+)", text).group(1), text))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        yield found
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig


def triton_ir(B, T, N, K, H, dtype, bq: int, bk: int) -> dict[str, str]:
    """{fwd|dq|dkdv: Triton IR} for forward + backward with (bq, bk) tiles in both passes."""
    q, kv = jax.ShapeDtypeStruct((B, T, N, H), dtype), jax.ShapeDtypeStruct((B, T, K, H), dtype)

    def grads(q, k, v):
        def f(q, k, v):
            o = flash_gpu.flash_attention(
                q, k, v, causal=True, block_q=bq, block_k=bk, block_q_bwd=bq, block_k_bwd=bk, interpret=False
            )
            return o.astype(jnp.float32).sum()

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    with _capture_triton_ir() as found:
        L.lower(grads, q, kv, kv, target_name="h100")
    out = {name.removeprefix("flash_").removesuffix("_gpu"): text for name, text in found}
    if set(out) != set(KERNELS):
        raise SystemExit(f"expected kernels {KERNELS}, lowered {sorted(out)}")
    return out


def compile_sm90(ir_text: str, num_warps: int, num_stages: int, workdir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    src = workdir / "kernel.ttir"
    src.write_text(ir_text)
    try:
        kern = triton.compile(
            str(src), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except Exception as e:  # Triton raises bare RuntimeErrors / compilation errors; report, keep sweeping
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    ptx = workdir / "kernel.ptx"
    ptx.write_text(kern.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    log = subprocess.run(
        [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(workdir / "k.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    smem = kern.metadata.shared
    return {
        "smem": smem,
        "regs": regs,
        "spill": spill,
        "wgmma": "wgmma" in kern.asm["ptx"],
        "fits": smem <= SMEM_LIMIT and spill == 0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--H", default="64,128", help="head dims")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = same as --heads")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--block-q", default="64,128")
    p.add_argument("--block-k", default="32,64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--defaults-only", action="store_true", help="only the DEFAULT_BLOCKS entries")
    args = p.parse_args(argv)
    try:
        import triton
    except ImportError:
        raise SystemExit("needs the triton package: pip install triton==3.6.0 (the GPU image's version)") from None
    ints = lambda s: [int(x) for x in s.split(",")]
    dtype = jnp.dtype(args.dtype)
    N, K = args.heads, args.kv_heads or args.heads
    print(f"triton {triton.__version__}, jax {jax.__version__}, target sm_90a, T={args.T} N={N} K={K} {dtype.name}")
    print("| H | kernel | block_q | block_k | warps | stages | smem KiB | regs | spill B | wgmma | fits | default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for H in ints(args.H):
            table = flash_gpu.DEFAULT_BLOCKS[max(32, 1 << (H - 1).bit_length())]
            defaults = {("fwd", *table["fwd"]), ("dq", *table["bwd"]), ("dkdv", *table["bwd"])}
            if args.defaults_only:
                jobs = sorted(defaults, key=lambda d: KERNELS.index(d[0]))
            else:
                tiles = (ints(args.block_q), ints(args.block_k), ints(args.warps), ints(args.stages))
                grid = itertools.product(KERNELS, *tiles)
                jobs = sorted(grid, key=lambda d: (d[1], d[2], KERNELS.index(d[0]), d[3], d[4]))
            irs: dict[tuple[int, int], dict[str, str]] = {}
            for kernel, bq, bk, nw, ns in jobs:
                if (bq, bk) not in irs:
                    irs[bq, bk] = triton_ir(1, args.T, N, K, H, dtype, bq, bk)
                r = compile_sm90(irs[bq, bk][kernel], nw, ns, Path(tmp))
                mark = "yes" if (kernel, bq, bk, nw, ns) in defaults else ""
                row = f"| {H} | {kernel} | {bq} | {bk} | {nw} | {ns} |"
                if "error" in r:
                    print(f"{row} {r['error']} | | | | no | {mark} |", flush=True)
                    continue
                print(
                    f"{row} {r['smem'] / 1024:.1f} | {r['regs']} | {r['spill']} | {'yes' if r['wgmma'] else 'no'} | "
                    f"{'yes' if r['fits'] else 'NO'} | {mark} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
