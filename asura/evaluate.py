"""Evaluate any checkpoint at any depths, with extrapolation chosen at evaluation time.

    python -m asura.evaluate --workdir runs/demo --depths 1-8 --extrapolation last [--step S|best|latest]
        [--task-difficulty D] [--data PATH] [--batches N] [--json OUT]
        [--exit RULE[:T1,T2,...] ...] [--exit-depth N] [--exit-kv copy|full]

Prints a table of the metrics that fit the data (asura.train.evaluate.shown_metrics, labels from
its SHOWN: tasks ce and em, byte-level text ce, acc and bpb, other text ce, acc and ppl) and (with
--json) writes one JSON object: per depth the final iteration's ce, accuracy, exact_match and
objective (asura.train.evaluate's metric names and meanings), perplexity = exp(ce) per scored
token, and bits_per_byte = ce / ln 2 only where it is bits per byte: byte-level text (a task
scores only its answer tokens, so its ce is not per byte of anything). The evaluation is
asura.analysis.depth.evaluate_depths (the training code path; one compiled program for every
depth of the sweep).

Per-token halting (--exit, repeatable; rules: asura.model.exits): a second table, per rule and
threshold at depth --exit-depth (default: the trained depth), of the mean exit depth per token, the
executed forward FLOPs per token (asura.flops.executed_flops) as a fraction of that fixed depth's
(kv=full saves nothing: every token still runs every iteration),
and the metrics with every token scored at its exit (asura.analysis.depth.evaluate_exits); the
JSON gets them as "exits". --exit-kv: what later iterations read from an exited token
(asura.model.halting: copy, what the KV-cached decoder computes; full, every token runs on).

Data: the checkpoint's own eval set by default; --task-difficulty D sets data.eval_difficulty
(tasks only: test length generalisation); --data PATH evaluates text shards from
`python -m asura.data.prepare` (tokenised with the checkpoint's tokenizer). Depths past
max_iterations need --extrapolation last|cycle (no retraining: it only picks which
per-iteration parameters the extra iterations reuse); no depth runs past asura.depth.DEPTH_LIMIT.
Every bad input is one line, exit 2; the flags (depths, the --json path) are checked before loading.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from asura.config.cli import OneLineParser, fail
from asura.infer.cli import add_model_flags, check_depth_limit, load_model, positive

PROG = "python -m asura.evaluate"


def parse_depths(spec: str) -> list[int]:
    """'1-8', '1,2,4' or '2-4,8' -> sorted distinct depths >= 1."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            fail(f"--depths {spec!r} is not a list of depths such as 1-8 or 1,2,4", PROG)
        a, b = int(lo), int(hi) if sep else int(lo)
        if a < 1 or b < a:
            fail(f"--depths {spec!r}: a range must be a-b with 1 <= a <= b", PROG)
        check_depth_limit("--depths", b, PROG)  # before range(): "1-100000000" builds no list
        out.update(range(a, b + 1))
    return sorted(out)


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Evaluate an asura checkpoint at a list of depths.")
    add_model_flags(p)
    p.add_argument("--depths", default=None, help="e.g. 1-8 or 1,2,4 (default: 1..max_iterations)")
    p.add_argument("--task-difficulty", type=int, default=None, help="task eval difficulty (data.eval_difficulty)")
    p.add_argument("--data", default=None, help="text shards from python -m asura.data.prepare")
    p.add_argument("--batches", type=int, default=None, help="eval batches (default: train.eval_batches)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument(
        "--exit",
        action="append",
        default=[],
        metavar="RULE[:T1,T2]",
        help="per-token halting: an exit rule (asura.model.exits) and thresholds (default: the rule's)",
    )
    p.add_argument("--exit-depth", type=int, default=None, help="depth the exit rules run to (default: trained depth)")
    p.add_argument("--exit-kv", default="copy", help="copy | full (asura.model.halting)")
    return p


def parse_exits(values: list[str], kv: str) -> list:
    """['latent:0.03,0.1', 'kl'] -> HaltSpecs, one per threshold (one-line errors naming --exit)."""
    from asura.model.halting import parse_specs

    try:
        return parse_specs(values, kv)
    except ValueError as e:
        fail(str(e), PROG)


def exit_table(rows: list[dict]) -> str:
    cols = ("exit rule", 12), ("threshold", 9), ("mean depth", 10), ("FLOPs/token", 11), ("vs fixed", 8)
    lines = ["  ".join(f"{c:>{w}}" for c, w in (*cols, ("em", 6), ("ce", 7)))]
    for r in rows:
        lines.append(
            f"{r['rule']:>12}  {'-' if r['threshold'] is None else format(r['threshold'], '.3g'):>9}  "
            f"{r['mean_depth']:>10.3f}  {r['flops_per_token']:>11.4g}  "
            f"{r['flops_ratio']:>8.1%}  {r['exact_match']:>6.3f}  {r['ce']:>7.4f}"
        )
    return "\n".join(lines)


def eval_config(cfg, args):
    """The checkpoint's config with the data chosen on the command line (validated)."""
    from asura.config import ConfigError, with_overrides

    over = {}
    if args.data is not None:
        over.update({"data.source": "text", "data.path": args.data})
    if args.task_difficulty is not None:
        if cfg.data.source != "task":
            fail(f"--task-difficulty applies to task data, but this checkpoint trained on {cfg.data.source}", PROG)
        over["data.eval_difficulty"] = args.task_difficulty
    try:
        return with_overrides(cfg, over) if over else cfg
    except ConfigError as e:
        fail(str(e), PROG)


def check_json_path(path: str) -> None:
    """The --json file must be writable before anything is evaluated (on gs://: its bucket must exist)."""
    from asura.storage.paths import StorageError, is_remote, to_path

    if is_remote(path):
        try:
            from asura.storage.gcs import check_readable

            check_readable(to_path(path))
        except StorageError as e:
            fail(f"--json {e}", PROG)
        return
    p = Path(os.fspath(to_path(path))).expanduser()
    parent = p.resolve().parent
    if p.is_dir():
        fail(f"--json {path} is a directory; give a file path, e.g. {p / 'eval.json'}", PROG)
    if not parent.exists():
        fail(f"--json {path}: its directory does not exist", PROG)
    if not parent.is_dir():
        fail(f"--json {path}: {parent} is not a directory", PROG)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        fail(f"--json {path} is not writable", PROG)


def table(cfg, rows: list[dict]) -> str:
    """depth and the shown metrics (asura.train.evaluate.SHOWN labels), one row per depth."""
    from asura.train.evaluate import SHOWN, shown_metrics, shown_values

    names = shown_metrics(cfg)
    widths = [max(8, len(SHOWN[m].label)) for m in names]
    lines = ["  ".join([f"{'depth':>5}", *(f"{SHOWN[m].label:>{w}}" for m, w in zip(names, widths, strict=True))])]
    for r in rows:
        values = shown_values(cfg, r)
        cells = [f"{values[m]:>{w}{SHOWN[m].fmt}}" for m, w in zip(names, widths, strict=True)]
        lines.append("  ".join([f"{r['depth']:>5}", *cells]) + ("  (extrapolated)" if r["extrapolated"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.data is not None and args.task_difficulty is not None:
        fail("--task-difficulty applies to task data; --data evaluates text shards (choose one)", PROG)
    for flag, value in (("--batches", args.batches), ("--task-difficulty", args.task_difficulty)):
        if value is not None:
            positive(flag, value, PROG)
    depths = parse_depths(args.depths) if args.depths is not None else None
    specs = parse_exits(args.exit, args.exit_kv)
    if args.exit_depth is not None:
        positive("--exit-depth", args.exit_depth, PROG)
        check_depth_limit("--exit-depth", args.exit_depth, PROG)
    if args.json is not None:
        check_json_path(args.json)

    loaded = load_model(args, PROG, [*(depths or []), *([args.exit_depth] if args.exit_depth else [])])
    if any(s.entry.needs_gate for s in specs) and not loaded.cfg.model.exit_gate:
        fail("--exit gate reads the learned exit gate, but this checkpoint trained without one (model.exit_gate)", PROG)
    cfg = eval_config(loaded.cfg, args)
    depths = depths or list(range(1, cfg.model.max_iterations + 1))
    from asura.analysis.depth import evaluate_depths
    from asura.data import build_eval_batches, check_compatible

    try:
        check_compatible(cfg)
        batches = build_eval_batches(cfg, args.batches or cfg.train.eval_batches)
    except ValueError as e:
        fail(str(e).splitlines()[0], PROG)
    if not batches:
        fail(f"no eval batches: {cfg.data.path or cfg.data.source} has no eval documents", PROG)
    from asura.train.evaluate import SHOWN, shown_metrics

    rows = evaluate_depths(loaded.model, batches, depths)
    derived = ["perplexity", *(["bits_per_byte"] if "bits_per_byte" in shown_metrics(cfg) else [])]
    for r in rows:
        r.update({m: SHOWN[m].value(r) for m in derived})
    print(f"{loaded.workdir} step {loaded.step}, extrapolation {cfg.model.extrapolation}, "
          f"max_iterations {cfg.model.max_iterations}, {len(batches)} batches")  # fmt: skip
    print(table(cfg, rows))
    exit_rows = []
    if specs:
        from asura.analysis.depth import evaluate_exits

        n_exit = args.exit_depth or cfg.model.iterations
        exit_rows = evaluate_exits(loaded.model, cfg, batches, n_exit, specs)
        print(f"per-token halting to depth {n_exit} (kv={args.exit_kv}); FLOPs vs every token at depth {n_exit}")
        print(exit_table(exit_rows))
    if args.json is not None:
        d = cfg.data
        data = {
            "source": d.source,
            "batches": len(batches),
            "tokens": sum(float(b["loss_mask"].sum()) for b in batches),
        }
        data.update({"task": d.task, "difficulty": d.eval_difficulty or d.difficulty} if d.source == "task" else {})
        data.update({"path": d.path, "tokenizer": d.tokenizer} if d.source == "text" else {})
        out = {
            "workdir": str(loaded.workdir), "step": loaded.step, "extrapolation": cfg.model.extrapolation,
            "max_iterations": cfg.model.max_iterations, "trained_depth": cfg.model.iterations, "data": data,
            "depths": rows, **({"exits": exit_rows} if specs else {}),
        }  # fmt: skip
        from asura.storage.paths import is_remote, to_path, write_whole

        target = args.json if is_remote(args.json) else os.path.expanduser(args.json)
        write_whole(to_path(target), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
