"""Train a looped transformer: `python train.py [--config FILE] [--workdir DIR] [key=value ...]`.

No arguments trains configs/demo.yaml in runs/demo. Resumes automatically from the newest
valid checkpoint in the workdir; rerunning a finished run prints its final metrics. To train a
finished run further, raise train.steps and say what the learning rate does from the old end:
`--extend continue` (the old schedule ends there and the lr holds at its floor) or
`--extend rewarm` (warm up again, then cosine to the new train.steps); see asura/train/resume.py.

Exit codes: 0 done, or stopped cleanly by SIGTERM/SIGINT (a checkpoint is saved first when
training had started); 2 bad input: config, CLI, data, workdir (busy, not writable), or a
checkpoint this code cannot use (nothing is moved); 3 too many consecutive non-finite steps;
4 a write to the workdir failed (checkpoint, config or metrics: disk full, unwritable); the
previous checkpoint is kept.
Every error is one line on stderr. See asura/train/loop.py for the workdir layout.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from asura.train.workdir import Signals

    Signals.install()  # first: a SIGTERM during imports or compilation must exit cleanly, not kill us
    from asura.config.cli import fail, parse_config_args

    def extra(parser):
        parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
        parser.add_argument(
            "--extend",
            default=None,
            choices=("continue", "rewarm"),
            help="with a raised train.steps on a trained workdir: continue (the old schedule ends, then the lr "
            "holds at its floor) or rewarm (warm up again, then cosine to the new train.steps)",
        )

    cfg, args = parse_config_args(argv, "train.py", "Train a looped-depth transformer.", extra)
    if args.workdir is not None and not args.workdir.strip():
        fail("--workdir is empty; pass a directory, or leave --workdir out for runs/<config name>", "train.py")
    from asura.parallel.distributed import initialize
    from asura.storage.paths import StorageError, to_path

    try:  # several processes (a pod slice, a GPU cluster): join them before touching devices
        initialize()
    except ValueError as e:
        fail(str(e).splitlines()[0], "train.py")

    try:  # a local directory or gs://bucket/prefix
        workdir = to_path(args.workdir if args.workdir is not None else f"runs/{cfg.name}")
    except StorageError as e:
        fail(str(e), "train.py")

    from asura.parallel.mesh import MeshError
    from asura.train.checkpoint import CheckpointError, CheckpointMismatchError, ConfigMismatchError, SaveError
    from asura.train.loop import NonFiniteError, run
    from asura.train.preflight import PreflightError
    from asura.train.workdir import WorkdirError

    refused = (ConfigMismatchError, CheckpointMismatchError, CheckpointError, WorkdirError, MeshError, PreflightError)
    try:
        summary = run(cfg, workdir, extend=args.extend)
    except refused as e:  # bad data/workdir/devices (preflight, before compiling) or unusable checkpoints
        fail(str(e).splitlines()[0], "train.py")
    except NonFiniteError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    except SaveError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        # The run is over and its last good checkpoint committed; a failed save leaves orbax's writer
        # tasks half-done, and tearing the interpreter down makes them report again (never-retrieved
        # futures, never-awaited coroutines). Nothing is left to flush but our own streams.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)
    from asura.train.metrics import final_line

    print(final_line(summary["cfg"], summary["status"], summary["step"], summary["wall_s"], summary["eval"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
