"""MFU of the real train step: a few timed steps on synthetic batches, FLOPs from the accountant.

    python bench/mfu.py --config configs/presets/looped_350m.yaml train.batch_size=32 [--steps 10] [--json F]
    python bench/mfu.py --cpu-smoke   # looped_tiny, 2 steps on the CPU: checks it runs; numbers meaningless

What is timed: the step train.py jits (asura.train.step.make_train_step through the placement,
state donated), on batches drawn with asura.data.synthetic on the device before timing and
rotated, so no input pipeline or host transfer is inside the timed region (data.source is
ignored). Each step is synchronised; the median step time gives tokens/s. FLOPs/token is
asura.flops' training count (6N per gradient iteration, remat recompute not counted, causal
attention halved), MFU = FLOP/s per device over asura.mfu's dense bf16 peak for the device kind.
Compile time is measured separately (lower + compile, before the first step).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SMOKE = [
    "--config",
    "configs/presets/looped_tiny.yaml",
    "data.source=synthetic",
    "depth.schedule=fixed",
    "train.batch_size=4",
    "data.seq_len=64",
]


def _args(parser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps: checks the script runs")


def main(argv: list[str] | None = None) -> dict:
    from asura.config.cli import REPO_ROOT, parse_config_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cpu-smoke" in argv:
        argv = [a for a in argv if a != "--cpu-smoke"] + SMOKE + ["--steps", "2"]
        argv[argv.index("--config") + 1] = str(REPO_ROOT / argv[argv.index("--config") + 1])
    cfg, args = parse_config_args(argv, "bench/mfu.py", "Time the train step; print tokens/s and MFU.", _args)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from asura.data.synthetic import SyntheticIterator
    from asura.depth import sample_depth
    from asura.mfu import local_device_kind, peak_flops
    from asura.parallel.placement import make_placement
    from asura.train.state import count_params, init_state
    from asura.train.step import make_train_step
    from asura.train.throughput import rates, train_flops_per_token

    built = init_state(cfg)
    placement = make_placement(cfg, built.axes)
    state = placement.state(built.state)
    data = SyntheticIterator(cfg)
    batches = [placement.batch(next(data)) for _ in range(3)]  # rotated: no buffer is reused back to back
    n = jnp.asarray(sample_depth(cfg, 0), jnp.int32)
    step = placement.jit_step(make_train_step(cfg, built.graphdef, built.rest, built.axes))

    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0], n).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batches[0], n)  # warm-up
    jax.block_until_ready((state, m))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[(i + 1) % 3], n)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    objective = float(m["objective"])
    if not np.isfinite(objective):
        raise SystemExit(f"bench/mfu.py: error: the objective is not finite ({objective}) after {args.steps} steps")

    step_s = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg)
    r = rates(cfg, tokens / step_s, flops_per_token, placement)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    out = {
        "config": cfg.name,
        "device": local_device_kind(),
        "devices": placement.n_devices,
        "jax": jax.__version__,
        "params": count_params(built.state["params"]),
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "depth": int(n),
        "attention": cfg.model.attention,
        "remat": cfg.model.remat,
        "compile_s": compile_s,
        "step_ms_median": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "tokens_per_s": r["train/tokens_per_s"],
        "flops_per_token": flops_per_token,
        "tflops_per_device": r.get("train/tflops_per_device"),
        "peak_tflops": (peak_flops(local_device_kind()) or 0) / 1e12 or None,
        "mfu": r.get("train/mfu"),
        "peak_mem_gib": (stats or {}).get("peak_bytes_in_use", 0) / 2**30 or None,
        "objective": objective,
    }
    _print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def _print(r: dict) -> None:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print(
        f"# {r['config']}: {r['params']:,} params on {r['devices']} x {r['device']} (jax {r['jax']}); "
        f"batch {r['batch']} x {r['seq_len']}, depth {r['depth']}, attention {r['attention']}, remat {r['remat']}"
    )
    print("| compile s | step ms (median, min-max) | tokens/s | TFLOP/s/device | peak TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['compile_s']:.1f} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
        f"{r['tokens_per_s']:,.0f} | {f(r['tflops_per_device'], '.1f')} | {f(r['peak_tflops'], '.0f')} | "
        f"{f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {f(r['peak_mem_gib'], '.1f')} |"
    )
    print(
        f"# FLOPs/token {r['flops_per_token']:.4g} (asura.flops: 6N per gradient iteration, remat recompute "
        f"not counted); objective after the timed steps {r['objective']:.4f}"
    )


if __name__ == "__main__":
    main()
