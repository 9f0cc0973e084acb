"""Per-token halting at decode time: answer exact match, executed iterations, counted FLOPs and wall
time of greedy generation under exit rules, next to every token at the full depth, at batch 1 and 8.

    python bench/halting_decode.py --workdir runs/gate_demo --exit gate:0.4,0.5 --exit kl:0.01
        [--depth N] [--batches 1,8] [--examples 64] [--reps 3]

A trained task checkpoint is needed (e.g. `python train.py --config configs/demo.yaml --workdir
runs/gate_demo model.guidance=none model.exit_gate=true model.exit_entropy=0.05`). Prompts are
the task's held-out eval problems; generation (asura.infer.generate, per_iteration cache, kv=copy)
stops at the answer's end. Per row of the table, in one run on one machine:

- em: answer exact match over --examples prompts;
- depth/token: mean iterations run by the position that produced each generated token (the
  prompt's last position, then each decoded one; the other prompt positions are prefilled and
  not counted);
- FLOPs: asura.flops.executed_flops of that depth pmf as a fraction of every token at depth N
  (what a decoder that skips an exited token's iterations computes at batch 1);
- wall b1, wall b8: seconds to generate every answer, --examples prompts in batches of 1 and of 8,
  best of --reps after a compile; the ratio to full depth beside it. In a batch a decode step's
  loop runs until the slowest row's token exits, so batch 8 saves less than batch 1.

Timings are of whatever machine runs it (jax.default_backend() is printed): compare rows within one
run only.
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
    p.add_argument("--workdir", required=True)
    p.add_argument("--exit", action="append", default=[], metavar="RULE[:T1,T2]")
    p.add_argument("--depth", type=int, default=None, help="the full depth (default: the trained depth)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes for wall time")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import jax

    from asura.data import tasks
    from asura.flops import executed_flops
    from asura.infer.generate import generate
    from asura.io.load import load
    from asura.model.halting import parse_specs

    try:
        specs = parse_specs(args.exit, "copy")
    except ValueError as e:
        p.error(str(e))
    loaded = load(args.workdir, "latest")
    cfg, model = loaded.cfg, loaded.model
    if cfg.data.source != "task":
        p.error("needs a task checkpoint (answers to score)")
    n = args.depth or cfg.model.iterations
    examples = tasks.eval_examples(cfg.data.task, cfg.data.difficulty, cfg.train.seed, args.examples)
    prompts = [list(ex.prompt.encode()) for ex in examples]
    max_new = max(len(ex.answer) for ex in examples) + 1
    batch_sizes = [int(b) for b in args.batches.split(",")]
    print(f"{loaded.workdir} step {loaded.step}; {cfg.data.task} difficulty {cfg.data.difficulty}, "
          f"{len(examples)} eval prompts, full depth {n}; {jax.default_backend()}, jax {jax.__version__}")  # fmt: skip

    def run(halt, B):
        outs = []
        for i in range(0, len(prompts), B):
            chunk = prompts[i : i + B]
            chunk = chunk + [chunk[-1]] * (B - len(chunk))  # one shape: the last batch is padded with repeats
            outs.append(generate(model, chunk, n, max_new_tokens=max_new, stop_tokens=[ord("\n")], halt=halt))
        return outs

    def wall(halt, B):
        run(halt, B)  # compile
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run(halt, B)
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    for halt in [None, *specs]:
        outs = run(halt, 1)
        tokens = [o.tokens[0] for o in outs]
        stopped = [o.stopped[0] for o in outs]
        right = [
            s and bytes(t[:-1]).decode(errors="replace") == ex.answer
            for t, s, ex in zip(tokens, stopped, examples, strict=True)
        ]
        depths = np.concatenate([np.asarray(o.depths[0]) for o in outs])
        pmf = {int(d): float(np.mean(depths == d)) for d in np.unique(depths)}
        entry = None if halt is None else halt.entry
        flops = executed_flops(
            cfg, pmf, rule_head=bool(entry and entry.needs_logits), rule_gate=bool(entry and entry.needs_gate)
        )
        times = {B: wall(halt, B) for B in batch_sizes}
        name = f"depth {n}" if halt is None else f"{halt.rule}:{halt.tau:g}"
        rows.append((name, float(np.mean(right)), float(depths.mean()), flops, times))

    full_flops, full_times = rows[0][3], rows[0][4]
    head = f"{'rule':>14}  {'em':>6}  {'depth/token':>11}  {'FLOPs':>6}" + "".join(
        f"  {f'wall b{B} (s)':>12}  {'ratio':>6}" for B in batch_sizes
    )
    print(head)
    for name, em, depth, flops, times in rows:
        cells = "".join(f"  {times[B]:>12.3f}  {times[B] / full_times[B]:>6.2f}" for B in batch_sizes)
        print(f"{name:>14}  {em:>6.3f}  {depth:>11.3f}  {flops / full_flops:>6.1%}{cells}")


if __name__ == "__main__":
    main()
