"""Loop overhead: model FLOPs per second of a looped model against the vanilla model that unrolls
the same depth (depth-matched: L·n layers), with the tricks on and off.

    .venv/bin/python bench/loop_overhead.py [--layers 2] [--n 4] [--d-model 256] [--seq 128] [--batch 8]
        [--reps 9] [--remat none] [--loop while]

Each step is value_and_grad of the training objective; FLOPs per token are asura.flops' training
counts (remat recompute not counted), so the ratio (looped FLOP/s) / (vanilla FLOP/s) says how
much of the hardware the loop's bookkeeping, per-iteration parameters and guidance cost. The two
programs run interleaved, call by call; medians. Goal (issue #18): >= 0.95 with every trick on.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
from skip_cost import random_batch, step_fn, timed_pair  # bench/ is on sys.path when run as a script

from asura.config.schema import Config, DataConfig, ModelConfig
from asura.flops import flop_count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--remat", default="none")
    p.add_argument("--loop", default="while")
    args = p.parse_args()
    V = 256
    batch = random_batch(args.batch, args.seq, V)
    common = dict(vocab_size=V, d_model=args.d_model, n_heads=4, remat=args.remat, loop=args.loop)
    vanilla = ModelConfig(**common, n_layers=args.layers * args.n, iterations=1, max_iterations=1,
                          injection="none", iter_norm=False, post_norm=False, guidance="none", qk_norm=False,
                          z_loss=0.0)  # fmt: skip
    looped_off = dataclasses.replace(vanilla, n_layers=args.layers, iterations=args.n, max_iterations=args.n)
    looped_on = dataclasses.replace(looped_off, injection="projconcat", iter_norm=True, post_norm=True,
                                    guidance="linear", qk_norm=True, z_loss=1e-4)  # fmt: skip

    def flops(m: ModelConfig) -> float:
        cfg = Config(model=m, data=DataConfig(seq_len=args.seq))
        return flop_count(cfg).train * args.batch * args.seq

    print(f"jax {jax.__version__}; L={args.layers} x n={args.n} vs L={args.layers * args.n}, d {args.d_model}, "
          f"T {args.seq}, B {args.batch}, remat {args.remat}, loop {args.loop}, {args.reps} reps")  # fmt: skip
    print("| looped | looped ms | vanilla ms | looped GFLOP/step | vanilla GFLOP/step | FLOP/s ratio |")
    print("|---|---|---|---|---|---|")
    base = step_fn(vanilla, batch, 1)
    for name, m in (("tricks off", looped_off), ("tricks on", looped_on)):
        looped_t, vanilla_t = timed_pair(step_fn(m, batch, args.n), base, args.reps)
        ml, mv = looped_t.wall_s, vanilla_t.wall_s
        fl, fv = flops(m), flops(vanilla)
        print(f"| {name} | {1e3 * ml:.1f} | {1e3 * mv:.1f} | {fl / 1e9:.3f} | {fv / 1e9:.3f} | "
              f"{(fl / ml) / (fv / mv):.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
