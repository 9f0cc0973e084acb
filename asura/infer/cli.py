"""What `python -m asura.generate` and `python -m asura.evaluate` share: the workdir/step/
extrapolation flags and the checks that turn every bad input into one line and exit 2
(asura.config.cli.fail). Pure python until `load_model`, which imports JAX.
"""

from __future__ import annotations

import argparse
import logging
import sys

from asura.config.cli import fail
from asura.config.schema import CHOICES


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a run directory written by train.py (or its checkpoints/<step>)")
    p.add_argument("--step", default="latest", help="checkpoint step: an integer, latest (default) or best")
    p.add_argument(
        "--extrapolation",
        default=None,
        choices=CHOICES["model.extrapolation"],
        help="parameters for depths past model.max_iterations: last | cycle (default: the checkpoint's own)",
    )


def parse_step(step: str, prog: str) -> int | str:
    if step in ("latest", "best"):
        return step
    if step.isdigit():
        return int(step)
    fail(f"--step must be an integer, latest or best, got {step!r}", prog)


def positive(name: str, value, prog: str, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        fail(f"{name} must be {'>= 0' if zero_ok else '>= 1'}, got {value}", prog)


def load_model(args, prog: str, depths: list[int]):
    """asura.analysis.load.Loaded for --workdir/--step/--extrapolation; refuses depths the model
    cannot run (past max_iterations without extrapolation) with the fix in one line."""
    from asura.analysis.load import LoadError, load
    from asura.depth import DepthError, scan_length

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices would break the one-line contract

    try:
        warn = lambda msg: print(f"{prog}: warning: {msg}", file=sys.stderr)
        loaded = load(args.workdir, parse_step(args.step, prog), extrapolation=args.extrapolation, warn=warn)
    except LoadError as e:
        fail(str(e), prog)
    try:
        scan_length(loaded.cfg.model, depths)
    except DepthError as e:
        fail(f"{e} (choose it here with --extrapolation last|cycle)", prog)
    return loaded
