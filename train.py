"""Train a looped transformer: `python train.py [--config FILE] [--workdir DIR] [key=value ...]`.

No arguments trains configs/demo.yaml in runs/demo. Resumes automatically from the newest
valid checkpoint in the workdir; rerunning a finished run prints its final metrics.

Exit codes: 0 done, or stopped cleanly by SIGTERM/SIGINT (a checkpoint is saved first when
training had started); 2 bad input: config, CLI, data, workdir (busy, not writable), or a
checkpoint this code cannot use (nothing is moved); 3 too many consecutive non-finite steps;
4 a checkpoint save failed (disk full, unwritable); the previous checkpoint is kept.
Every error is one line on stderr. See asura/train/loop.py for the workdir layout.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from asura.train.workdir import Signals

    Signals.install()  # first: a SIGTERM during imports or compilation must exit cleanly, not kill us
    from asura.config.cli import fail, parse_config_args

    def extra(parser):
        parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")

    cfg, args = parse_config_args(argv, "train.py", "Train a looped-depth transformer.", extra)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / cfg.name

    from asura.parallel.mesh import MeshError
    from asura.train.checkpoint import CheckpointError, CheckpointMismatchError, ConfigMismatchError, SaveError
    from asura.train.loop import NonFiniteError, run
    from asura.train.preflight import PreflightError
    from asura.train.workdir import WorkdirError

    refused = (ConfigMismatchError, CheckpointMismatchError, CheckpointError, WorkdirError, MeshError, PreflightError)
    try:
        summary = run(cfg, workdir)
    except refused as e:  # bad data/workdir/devices (preflight, before compiling) or unusable checkpoints
        fail(str(e).splitlines()[0], "train.py")
    except NonFiniteError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    except SaveError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 4
    ev, nan = summary["eval"], float("nan")
    if not ev:  # stopped before anything was trained or evaluated
        print(f"{summary['status']} at step {summary['step']} in {summary['wall_s']:.1f}s")
        return 0
    print(
        f"{summary['status']} at step {summary['step']} in {summary['wall_s']:.1f}s: "
        f"eval ce {ev.get('eval/ce', nan):.4f}, accuracy {ev.get('eval/accuracy', nan):.3f}, "
        f"answer exact-match {ev.get('eval/exact_match', nan):.3f} (depth {cfg.model.iterations})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
