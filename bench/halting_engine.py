"""Does skipping an exited token's iterations save decode wall time where compute dominates? The engine
alone, without training: a randomly initialised LoopedLM of the given shape generates --new tokens
after random --prompt tokens (greedy, KV-cached, kv=copy) at every batch size, once with every token
at depth n and once under `steps:k` for each k < n (every token exits after k iterations: what a
halting rule that stops there runs). Beside each, the same generation at fixed depth k without
halting: its wall time is what the halting path should approach, so the gap is halting's overhead
(the rule, the selects, the copied keys/values).

    .venv/bin/python bench/halting_engine.py [--d-model 1024] [--layers 2] [--depth 4] [--exits 1,2,3]
        [--batches 1,8] [--prompt 32] [--new 32] [--reps 5]

Per row: executed forward FLOPs of the decoded tokens against depth n (asura.flops.executed_flops),
wall time (best of --reps after a compile) and its ratio to depth n, and the ratio to fixed depth k
(halting's overhead). Compare rows within one run only: timings are of whatever machine runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--depth", type=int, default=4, help="the full depth n")
    p.add_argument("--exits", default="1,2,3", help="comma-separated k < n: every token exits after k")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    exits = [int(k) for k in args.exits.split(",")]
    if any(not 1 <= k < args.depth for k in exits):
        p.error(f"--exits must lie in 1..{args.depth - 1} (below --depth)")

    import jax
    from flax import nnx

    from asura.config import load_config
    from asura.flops import executed_flops
    from asura.infer.generate import generate
    from asura.model import LoopedLM
    from asura.model.halting import HaltSpec

    n = args.depth
    cfg = load_config(None, [
        f"model.d_model={args.d_model}", f"model.n_heads={args.heads}", f"model.n_layers={args.layers}",
        f"model.iterations={n}", f"model.max_iterations={n}", "model.guidance=none",
        f"data.seq_len={args.prompt + args.new}",
    ])  # fmt: skip
    model = LoopedLM(cfg.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    V = cfg.model.vocab_size
    print(f"d_model {args.d_model}, {args.layers} layer(s), depth {n}, prompt {args.prompt} + {args.new} new tokens; "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")  # fmt: skip

    def timed(B, depth, halt):
        prompts = rng.integers(0, V, (B, args.prompt)).tolist()
        run = lambda: generate(model, prompts, depth, max_new_tokens=args.new, halt=halt)
        run()  # compile
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        return best

    full = executed_flops(cfg, {n: 1.0})
    print(f"{'batch':>5}  {'setting':>10}  {'FLOPs':>6}  {'wall (s)':>9}  {'vs depth n':>10}  {'vs fixed k':>10}")
    for B in [int(b) for b in args.batches.split(",")]:
        t_full = timed(B, n, None)
        print(f"{B:>5}  {f'depth {n}':>10}  {1:>6.1%}  {t_full:>9.3f}  {1:>10.2f}  {'-':>10}")
        for k in exits:
            t_halt = timed(B, n, HaltSpec("steps", float(k)))
            t_fixed = timed(B, k, None)
            ratio = executed_flops(cfg, {k: 1.0}) / full
            print(f"{B:>5}  {f'steps:{k}':>10}  {ratio:>6.1%}  {t_halt:>9.3f}  {t_halt / t_full:>10.2f}  "
                  f"{t_halt / t_fixed:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
