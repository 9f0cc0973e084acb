"""Host input-pipeline throughput and its headroom over what training consumes.

Cases (configs/demo.yaml with these changes; every case runs the pipeline as training does, prefetch included):
  task:addition demo         the demo's own pipeline. Its 10-token examples fit 6 to a 64-token row, so they go
                             through the first-fit packer (only fixed-length examples too long to share a row skip it)
  task:addition pack=false   one example per row: the same documents without packing
  text:pydoc T=256, T=1024   the offline pydoc corpus (prepared into a temp dir on first use), packed, at the
                             looped_350m preset's batch of 512 rows

Headroom, each a median over interleaved repeats of (this repeat's rows/s) / (the consumer's rows/s):
  vs demo   rows/s that `train.py --config configs/demo.yaml` consumes, measured by a short run in a subprocess
            each repeat (train/tokens_per_s / seq_len from its metrics.jsonl; compilation excluded; it shares the
            CPU with its own input pipeline, as the demo does)
  vs GPU    an assumed rate, not a measurement: looped_350m (configs/presets/looped_350m.yaml) training on one
            H200 at 40% MFU of 989 TFLOP/s bf16 dense, so tokens/s = 0.4 * 989e12 / train FLOPs per token from
            asura.flops at the case's seq_len, and rows/s = tokens/s / seq_len

pydoc has 66 training documents, and grain's index_shuffle costs ~0.3 ms per call on so small an epoch
(~6 µs on 2**20 indices): at T=1024 that is about 60% of the text case's CPU, so a realistic corpus runs faster.

On a shared machine every rate moves with the load; the repeats interleave every case with the demo run so
that each ratio compares numbers taken minutes apart, and the medians are what to quote.

    .venv/bin/python bench/data_pipeline.py [--repeats 3] [--seconds 4] [--demo-steps 60] [--rng]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asura.config.load import load_config, with_overrides
from asura.data import pipeline, prepare

ROOT = Path(__file__).resolve().parents[1]  # train.py and configs/ of the checkout this script sits in

H200_BF16_FLOPS = 989e12
ASSUMED_MFU = 0.40
GPU_PRESET = ROOT / "configs" / "presets" / "looped_350m.yaml"


def measure(cfg, seconds: float, min_batches: int = 20, warmup: int = 3) -> dict:
    """Rows/s over at least `seconds` and `min_batches` after warm-up, and process CPU ms per batch."""
    it = pipeline.build_train_iterator(cfg)
    try:
        for _ in range(warmup):
            next(it)
        n = real = 0
        t0, c0 = time.perf_counter(), time.process_time()
        while n < min_batches or time.perf_counter() - t0 < seconds:
            batch = next(it)
            real += int((batch["segment_ids"] > 0).sum())
            n += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        total = n * batch["segment_ids"].size
    finally:
        it.close()
    return {"rows_s": n * cfg.train.batch_size / dt, "cpu_ms": 1e3 * cpu / n, "fill": real / total}


def demo_rows_per_s(config: str, steps: int) -> float:
    """Rows/s a short `train.py` run consumes: the median of its throughput windows (compilation excluded)."""
    with tempfile.TemporaryDirectory() as workdir:
        argv = [sys.executable, str(ROOT / "train.py"), "--config", config, "--workdir", workdir]
        argv += [f"train.steps={steps}", "train.log_every=10", "train.eval_every=1000000"]
        argv += ["train.checkpoint_every=1000000", "train.eval_batches=1"]
        subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    tokens_s = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    return statistics.median(tokens_s) / load_config(config).data.seq_len


def gpu_rows_per_s(seq_len: int) -> float:
    """looped_350m rows/s on one H200 at the assumed MFU (see the module docstring)."""
    from asura.flops import flop_count

    cfg = with_overrides(load_config(GPU_PRESET), {"data.seq_len": seq_len})
    return ASSUMED_MFU * H200_BF16_FLOPS / float(flop_count(cfg).train) / seq_len


def rng_microbench(n: int = 20000, repeats: int = 7) -> tuple[float, float]:
    """(µs per tasks.example_rng call, µs per fresh Generator(Philox(key, counter))), interleaved medians."""
    import numpy as np

    from asura.data import tasks

    def fresh(seed, stream, index):
        return np.random.Generator(np.random.Philox(key=[seed, stream], counter=[0, index, 0, 0]))

    times = {tasks.example_rng: [], fresh: []}
    for _ in range(repeats):
        for f, out in times.items():
            t0 = time.perf_counter()
            for i in range(n):
                f(0, 0, i).integers(0, 10)
            out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times[tasks.example_rng]), statistics.median(times[fresh])


def text_dir_default() -> str:
    text_dir = os.path.join(tempfile.gettempdir(), "asura_bench_pydoc")
    if not os.path.isfile(os.path.join(text_dir, "metadata.json")):
        prepare.main(["--builtin", "pydoc", "--output", text_dir, "--overwrite"])
    return text_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="per case and repeat")
    p.add_argument("--demo-steps", type=int, default=60, help="train.py steps per repeat; 0: skip the demo run")
    p.add_argument("--text-dir", default="", help="prepared shards; default: pydoc into a temp dir")
    p.add_argument("--text-batch", type=int, default=0, help="rows per text batch; default: the GPU preset's")
    p.add_argument("--rng", action="store_true", help="also time tasks.example_rng")
    args = p.parse_args()

    base = load_config(args.config)
    text_dir = args.text_dir or text_dir_default()
    text_batch = args.text_batch or load_config(GPU_PRESET).train.batch_size
    cases = {"task:addition demo": base, "task:addition pack=false": with_overrides(base, {"data.pack": False})}
    for t in (256, 1024):
        text = {"data.source": "text", "data.path": text_dir, "data.seq_len": t, "train.batch_size": text_batch}
        cases[f"text:pydoc T={t}"] = with_overrides(base, text)
    for cfg in cases.values():
        pipeline.check_compatible(cfg)
    gpu = {t: gpu_rows_per_s(t) for t in {cfg.data.seq_len for cfg in cases.values() if cfg.data.source == "text"}}

    runs = {name: [] for name in cases}
    demo = []
    for r in range(args.repeats):
        for name, cfg in cases.items():
            runs[name].append(measure(cfg, args.seconds))
            print(f"repeat {r}: {name:26s} rows/s={runs[name][-1]['rows_s']:9.0f}", file=sys.stderr)
        if args.demo_steps:
            demo.append(demo_rows_per_s(args.config, args.demo_steps))
            print(f"repeat {r}: demo train.py consumes rows/s={demo[-1]:.1f}", file=sys.stderr)

    med = statistics.median
    print(f"\nmedians of {args.repeats} interleaved repeats, {args.seconds:g} s per case per repeat")
    if demo:
        print(f"demo consumption (train.py, {args.demo_steps} steps): {med(demo):.1f} rows/s")
    print(", ".join(f"GPU looped_350m T={t} at {ASSUMED_MFU:.0%} MFU: {v:.1f} rows/s" for t, v in sorted(gpu.items())))
    print("\n| case | B | T | rows/s | tokens/s | CPU ms/batch | fill | headroom vs demo | headroom vs GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in cases.items():
        rows = [m["rows_s"] for m in runs[name]]
        vs_demo = f"{med([a / b for a, b in zip(rows, demo)]):.1f}x" if demo and cfg.data.source == "task" else ""
        vs_gpu = f"{med(rows) / gpu[cfg.data.seq_len]:.1f}x" if cfg.data.source == "text" else ""
        print(
            f"| {name} | {cfg.train.batch_size} | {cfg.data.seq_len} | {med(rows):.0f} | "
            f"{med(rows) * cfg.data.seq_len:.3g} | {med([m['cpu_ms'] for m in runs[name]]):.2f} | "
            f"{med([m['fill'] for m in runs[name]]):.2f} | {vs_demo} | {vs_gpu} |"
        )
    if args.rng:
        new, fresh = rng_microbench()
        print(f"\ntasks.example_rng: {new:.2f} µs/call (incl. one draw) vs {fresh:.2f} µs building Generator(Philox)")


if __name__ == "__main__":
    main()
