"""Host input-pipeline throughput: rows/s of build_train_iterator, one line per source.

Compare rows/s with what training consumes (train steps/s x train.batch_size): the
pipeline must stay well ahead. Text uses the offline pydoc corpus, prepared into a
temp dir on first use.

    .venv/bin/python bench/data_pipeline.py [--config configs/demo.yaml] [--batches 200] [--text-seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from asura.config.load import load_config, with_overrides
from asura.data import pipeline, prepare


def measure(cfg, n_batches: int, warmup: int = 5) -> tuple[float, float, float]:
    """(rows/s wall, process CPU ms per batch, tokens-in-documents fraction) after warm-up, prefetch included."""
    it = pipeline.build_train_iterator(cfg)
    for _ in range(warmup):
        next(it)
    real = total = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        batch = next(it)
        real += int((batch["segment_ids"] > 0).sum())
        total += batch["segment_ids"].size
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    it.close()
    return n_batches * cfg.train.batch_size / dt, 1e3 * cpu / n_batches, real / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--text-seq-len", type=int, default=256)
    p.add_argument("--text-dir", default="", help="prepared shards; default: pydoc into a temp dir")
    args = p.parse_args()

    base = load_config(args.config)
    text_dir = args.text_dir
    if not text_dir:
        text_dir = os.path.join(tempfile.gettempdir(), "asura_bench_pydoc")
        if not os.path.isfile(os.path.join(text_dir, "metadata.json")):
            prepare.main(["--builtin", "pydoc", "--output", text_dir, "--overwrite"])
    cases = {
        f"task:{base.data.task}": base,
        f"task:{base.data.task}(pack=false)": with_overrides(base, {"data.pack": False}),
        f"task:{base.data.task}(difficulty=1,packed)": with_overrides(base, {"data.difficulty": 1}),
        "text:pydoc": with_overrides(
            base, {"data.source": "text", "data.path": text_dir, "data.seq_len": args.text_seq_len}
        ),
    }
    for name, cfg in cases.items():
        pipeline.check_compatible(cfg)
        rows_s, cpu_ms, fill = measure(cfg, args.batches)
        print(
            f"{name:32s} rows/s={rows_s:9.0f}  batches/s={rows_s / cfg.train.batch_size:7.1f}  "
            f"tokens/s={rows_s * cfg.data.seq_len:10.0f}  B={cfg.train.batch_size} T={cfg.data.seq_len} "
            f"fill={fill:.2f} cpu_ms/batch={cpu_ms:.1f}"
        )


if __name__ == "__main__":
    main()
