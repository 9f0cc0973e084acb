"""Export a trained checkpoint for others to load: safetensors + config + tokenizer.

    python -m asura.export --workdir runs/demo --out exports/demo [--step S|latest|best] [--format asura|stock]

--format asura (default): model.safetensors, config.json, generation_config.json, the tokenizer
(byte-level, or the run's tokenizers JSON) and configuration_asura.py + modeling_asura.py, which
transformers loads with trust_remote_code=True; `model.generate(ids, depth=n)` runs any depth
(past max_iterations with extrapolation="last"|"cycle"), as `python -m asura.generate` does.
--format stock: a vanilla run (one iteration, no loop tricks, RMSNorm + SwiGLU + RoPE) as a stock
Llama (Qwen3 with model.qk_norm), no remote code; any other config is refused naming the flag.
Tensor names: asura.io.names. --out must be a new or empty local directory; nothing is
overwritten. Every bad input is one line on stderr and exit 2, before anything is written.
"""

from __future__ import annotations

import sys

from asura.config.cli import OneLineParser, fail
from asura.infer.cli import parse_step

PROG = "python -m asura.export"


def parser() -> OneLineParser:
    from asura.io.export import FORMATS

    p = OneLineParser(prog=PROG, description="Export a trained asura checkpoint (safetensors + transformers).")
    p.add_argument("--workdir", required=True, help="a run directory written by train.py (or its checkpoints/<step>)")
    p.add_argument("--step", default="latest", help="checkpoint step: an integer, latest (default) or best")
    p.add_argument("--out", required=True, help="a new or empty local directory")
    p.add_argument("--format", default="asura", choices=FORMATS, help="asura (trust_remote_code) | stock (Llama/Qwen3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    step = parse_step(args.step, PROG)
    from asura.io.export import ExportError, check_out, export
    from asura.io.load import LoadError

    try:
        check_out(args.out)
        warn = lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr)
        done = export(args.workdir, args.out, step=step, fmt=args.format, warn=warn)
    except (ExportError, LoadError) as e:
        fail(str(e), PROG)
    print(f"{done.out}: {done.architecture} from step {done.step} ({done.tensors} tensors; {', '.join(done.files)})")
    if done.format == "asura":
        print(f"load: AutoModelForCausalLM.from_pretrained({str(done.out)!r}, trust_remote_code=True)")
    else:
        print(f"load: AutoModelForCausalLM.from_pretrained({str(done.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
