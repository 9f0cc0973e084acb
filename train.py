"""Train a looped transformer: `python train.py [--config FILE] [--workdir DIR] [key=value ...]`.

No arguments trains configs/demo.yaml in runs/demo. Resumes automatically from the
newest valid checkpoint in the workdir. Exit codes: 0 done (or saved after SIGTERM/SIGINT),
2 bad config/CLI input or a config that does not match the workdir's, 3 too many
consecutive non-finite steps. See asura/train/loop.py for the workdir layout.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from asura.config.cli import fail, parse_config_args

    def extra(parser):
        parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")

    cfg, args = parse_config_args(argv, "train.py", "Train a looped-depth transformer.", extra)
    try:  # data/model checks are pure python: still before any JAX compile
        from asura.train.loop import data_api

        data_api().check_compatible(cfg)
    except ValueError as e:
        fail(str(e).splitlines()[0], "train.py")
    workdir = Path(args.workdir) if args.workdir else Path("runs") / cfg.name

    from asura.train.checkpoint import ConfigMismatchError
    from asura.train.loop import NonFiniteError, run

    try:
        summary = run(cfg, workdir)
    except ConfigMismatchError as e:
        fail(str(e), "train.py")
    except NonFiniteError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    ev = summary["eval"]
    loss = summary["final_loss"]
    print(
        f"{summary['status']} at step {summary['step']} in {summary['wall_s']:.1f}s: "
        f"train loss {loss:.4f}, eval loss {ev.get('eval/loss', float('nan')):.4f}, "
        f"answer exact-match {ev.get('eval/exact_match', float('nan')):.3f} (depth {cfg.model.iterations})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
