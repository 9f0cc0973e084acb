"""What skipped iterations cost: one program compiled for S = max_iterations, run at depth n < S,
against a program compiled for S = n, per remat policy and loop driver (model.loop).

    .venv/bin/python bench/skip_cost.py [--d-model 256] [--seq 128] [--batch 8] [--reps 15]
        [--pairs 2:16,8:16] [--policies none,block,iteration,sqrt] [--loops scan,while] [--no-per-iteration]

The step is value_and_grad of the training objective (the train step without the optimizer
update). The two programs of a pair run interleaved, call by call,
so a busy machine slows both alike; the ratio is median(S) / median(S = n). `sys ms` is the kernel CPU
time per call (all threads): on the CPU mostly page faults, since XLA:CPU maps a call's buffers afresh
(bench/RESULTS.md, "Skipped iterations"). Goal (issue #18):
<= 1.05 for every policy. `--no-per-iteration` drops the tricks that give the model per-iteration
parameters (ProjConcat's W_proj[t], per-iteration norms): with them, the S-program has S/n times as
many, and its gradient has S rows whatever n is. ASURA_UNINITIALISED=0 times the CPU zero fill of the
loop buffers (asura.native.uninitialised) for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.config.schema import ModelConfig
from asura.model.remat import POLICIES


def build(cfg: ModelConfig):
    from asura.model.looped import LoopedLM

    return LoopedLM(cfg, rngs=nnx.Rngs(0))


def random_batch(batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "inputs": jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
    }


def objective_grad(cfg: ModelConfig, batch, n: int):
    """(the jitted value_and_grad of the objective at depth n, the model state it takes)."""
    graphdef, state = nnx.split(build(cfg))

    @jax.jit
    def step(s):
        return jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=jnp.int32(n))[0])(s)

    return step, state


def step_fn(cfg: ModelConfig, batch, n: int):
    """A compiled, warmed value_and_grad of the objective at depth n; calling it runs one step."""
    step, state = objective_grad(cfg, batch, n)
    jax.block_until_ready(step(state))  # compile + warm
    return lambda: jax.block_until_ready(step(state))


class Timing(NamedTuple):
    wall_s: float  # median wall time per call
    sys_s: float  # median kernel CPU time per call, all threads (page faults: XLA:CPU maps a call's buffers afresh)


def timed_pair(a, b, reps: int) -> tuple[Timing, Timing]:
    """Medians of a() and b() called alternately, so a busy machine slows both alike."""
    samples: tuple[list, list] = ([], [])  # (wall, sys) per call, for a and for b
    for _ in range(reps):
        for f, out in zip((a, b), samples):
            s0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
            f()
            out.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0))
    return tuple(Timing(*(statistics.median(col) for col in zip(*calls))) for calls in samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--pairs", default="2:16,8:16", help="n:S pairs")
    p.add_argument("--policies", default=",".join(POLICIES.names))
    p.add_argument("--loops", default="scan,while")
    p.add_argument("--no-per-iteration", action="store_true", help="injection add, no per-iteration norms")
    args = p.parse_args()
    V = 256
    batch = random_batch(args.batch, args.seq, V)
    base = ModelConfig(vocab_size=V, d_model=args.d_model, n_heads=4, n_layers=args.layers, guidance="linear",
                       extrapolation="none")  # fmt: skip
    if args.no_per_iteration:
        base = dataclasses.replace(base, injection="add", iter_norm=False, post_norm=False)
    where = f"jax {jax.__version__} on {jax.devices()[0].platform}"
    print(f"{where}; d_model {args.d_model}, layers {args.layers}, T {args.seq}, B {args.batch}, fp32, "
          f"{'no per-iteration parameters' if args.no_per_iteration else 'every trick on (demo flags)'}, "
          f"guidance linear; {args.reps} reps")  # fmt: skip
    print("| loop | remat | n | S | step ms (S) | step ms (S = n) | ratio | sys ms (S) | sys ms (S = n) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loop in args.loops.split(","):
        for policy in args.policies.split(","):
            for pair in args.pairs.split(","):
                n, S = map(int, pair.split(":"))
                big = dataclasses.replace(base, iterations=n, max_iterations=S, remat=policy, loop=loop)
                small = dataclasses.replace(big, max_iterations=n)
                t_big, t_small = timed_pair(step_fn(big, batch, n), step_fn(small, batch, n), args.reps)
                print(f"| {loop} | {policy} | {n} | {S} | {1e3 * t_big.wall_s:.1f} | {1e3 * t_small.wall_s:.1f} "
                      f"| {t_big.wall_s / t_small.wall_s:.2f} | {1e3 * t_big.sys_s:.1f} | {1e3 * t_small.sys_s:.1f} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
