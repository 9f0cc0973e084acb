"""Attention benchmark: implementation x (T, d_head) -> forward ms, fwd+bwd ms, TFLOP/s, ratios.

    python bench/attention.py --T 1024,2048,4096 --d 64,128 --heads 16 --dtype bfloat16 --impls pallas,cudnn,xla
    python bench/attention.py --cpu-smoke   # tiny shapes, interpret-mode Pallas: checks it runs; times meaningless

FLOP convention (matmul flops only, causal halved): forward = 4*B*N*T^2*H / 2 (causal) or 4*B*N*T^2*H;
backward = 2.5 x forward (five T x T x H matmuls: recompute S, dP, dV, dK, dQ vs two forward), so
fwd+bwd = 3.5 x forward. This matches FlashAttention-2's reporting. Timing: jit, warm-up calls,
block_until_ready, median over --reps, rotating among 3 input sets so repeated calls don't hit one buffer.
Each impl's forward output is also checked against xla (rel err column) before being timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from asura.model import attention as A


def flops_fwd(B: int, T: int, N: int, H: int, causal: bool) -> float:
    f = 4.0 * B * N * T * T * H
    return f / 2 if causal else f


def _time(fn, inputs, warmup: int, reps: int) -> float:
    """Median wall time (ms) of fn over rotating inputs, each call synchronised."""
    for i in range(warmup):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(impl, B, T, N, K, H, dtype, causal, args):
    q_shape, k_shape = (B, T, N, H), (B, T, K, H)
    ok, why = A.supports(impl, q_shape, k_shape, dtype)
    if not ok:
        return {"skip": why}
    sets = []
    for s in range(3):
        kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(s), 4)
        sets.append(
            tuple(
                jax.random.normal(key, shape, jnp.float32).astype(dtype)
                for key, shape in ((kq, q_shape), (kk, k_shape), (kv, k_shape), (kd, q_shape))
            )
        )
    kw = dict(causal=causal, impl=impl, block_q=args.block_q, block_k=args.block_k)
    fwd = jax.jit(lambda q, k, v: A.attention(q, k, v, **kw))

    def loss(q, k, v, do):
        return jnp.sum(A.attention(q, k, v, **kw).astype(jnp.float32) * do.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    q, k, v, _ = sets[0]
    o = np.asarray(fwd(q, k, v), np.float64)
    ref = np.asarray(jax.jit(lambda q, k, v: A.xla_attention(q, k, v, causal=causal))(q, k, v), np.float64)
    err = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
    t_f = _time(fwd, [s_[:3] for s_ in sets], args.warmup, args.reps)
    t_fb = _time(fwd_bwd, sets, args.warmup, args.reps)
    f = flops_fwd(B, T, N, H, causal)
    return {"fwd_ms": t_f, "fb_ms": t_fb, "fwd_tf": f / t_f / 1e9, "fb_tf": 3.5 * f / t_fb / 1e9, "err": err}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="1024,2048,4096", help="comma-separated sequence lengths")
    p.add_argument("--d", default="64,128", help="comma-separated head dims")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="0 = heads (MHA); fewer = GQA")
    p.add_argument("--batch", type=int, default=0, help="0 = max(1, 16384 // T) tokens-per-batch fill")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", default="pallas,cudnn,xla")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--block-q", type=int, default=0, help="Pallas block_q (0 = tuned default)")
    p.add_argument("--block-k", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret-mode kernels, 2 reps")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.T, args.d, args.heads, args.batch, args.reps, args.warmup = "32,64", "32", 2, 1, 2, 1
        args.impls = "pallas,cudnn,xla"
        args.block_q = args.block_q or 16
        args.block_k = args.block_k or 16

    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    Ts, ds = [int(x) for x in args.T.split(",")], [int(x) for x in args.d.split(",")]
    impls = args.impls.split(",")
    N, K, causal = args.heads, args.kv_heads or args.heads, not args.non_causal
    print(
        f"# backend={backend} device={jax.devices()[0].device_kind} jax={jax.__version__} dtype={dtype.name} "
        f"heads={N} kv_heads={K} causal={causal}"
    )
    if backend == "cpu":
        print("# WARNING: CPU backend: Pallas runs in interpret mode; timings are meaningless (smoke test only).")
    hdr = (
        f"{'impl':8} {'T':>6} {'d':>4} {'B':>3} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} {'f+b TF/s':>9} "
        f"{'fwd/cudnn':>9} {'f+b/cudnn':>9} {'fwd/xla':>8} {'f+b/xla':>8} {'relerr':>8}"
    )
    print(hdr)
    for T in Ts:
        for d in ds:
            B = args.batch or max(1, 16384 // T)
            res = {impl: bench_one(impl, B, T, N, K, d, dtype, causal, args) for impl in impls}
            for impl, r in res.items():
                if "skip" in r:
                    print(f"{impl:8} {T:>6} {d:>4} {B:>3}  n/a: {r['skip']}")
                    continue

                def ratio(base, key, r=r, res=res):  # speedup of this impl over base (base time / this time)
                    b = res.get(base, {})
                    return f"{b[key] / r[key]:.2f}x" if key in b else "-"

                print(
                    f"{impl:8} {T:>6} {d:>4} {B:>3} {r['fwd_ms']:>9.3f} {r['fb_ms']:>9.3f} {r['fwd_tf']:>9.1f} "
                    f"{r['fb_tf']:>9.1f} {ratio('cudnn', 'fwd_ms'):>9} {ratio('cudnn', 'fb_ms'):>9} "
                    f"{ratio('xla', 'fwd_ms'):>8} {ratio('xla', 'fb_ms'):>8} {r['err']:>8.1e}"
                )
    print("# ratios are speedups (base time / impl time); TFLOP/s count causal-halved matmul flops, bwd = 2.5x fwd.")


if __name__ == "__main__":
    main()
