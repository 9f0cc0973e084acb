"""What `python -m asura.generate` and `python -m asura.evaluate` share: the workdir/step/
extrapolation flags and the checks that turn every bad input into one line and exit 2
(asura.config.cli.fail). No JAX until `load_model`, which imports it.

Text from the command line: Python reads an argv byte that is not valid UTF-8 as a lone
surrogate (surrogateescape). `encode_text` gives the byte tokenizer the original bytes back
(os.fsencode) and refuses such text for any other tokenizer; `show` prints any output, the
bytes of a byte model that are not UTF-8 as \\xNN escapes.
"""

from __future__ import annotations

import argparse
import os
import sys

from asura.config.cli import fail
from asura.config.schema import CHOICES
from asura.depth import DEPTH_LIMIT


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


def check_depth_limit(flag: str, depth: int, prog: str) -> None:
    """Refuse a depth past asura.depth.DEPTH_LIMIT before any loading (scan_length would, later)."""
    if depth > DEPTH_LIMIT:
        fail(f"{flag} {depth} is past asura.depth.DEPTH_LIMIT={DEPTH_LIMIT} iterations (each one runs the whole "
             f"block stack); choose depths in 1..{DEPTH_LIMIT}", prog)  # fmt: skip


def unescape(text: str) -> str:
    """Python escapes (\\n, \\t, \\xNN, \\uNNNN) read; every other character, a surrogate-escaped
    argv byte included, kept as it is."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def encode_text(tok, text: str, flag: str, prog: str) -> list[int]:
    """Token ids of command-line text (see the module docstring for bytes that are not UTF-8)."""
    if tok.spec == "byte":
        return list(os.fsencode(text))  # the bytes the user passed, valid UTF-8 or not
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(f"{flag} holds a byte that is not valid UTF-8 (at character {e.start}); tokenizer {tok.spec} encodes "
             "text only (the byte tokenizer takes any bytes)", prog)  # fmt: skip
    return tok.encode_batch([text])[0]


def show(tok, ids) -> str:
    """Text to print for generated ids: a byte model's bytes that are not UTF-8 become \\xNN, and any
    character stdout cannot encode (an ASCII-only terminal) is escaped the same way: never a crash."""
    text = bytes(int(i) for i in ids).decode("utf-8", "backslashreplace") if tok.spec == "byte" else tok.decode(ids)
    enc = sys.stdout.encoding or "utf-8"
    return text.encode(enc, "backslashreplace").decode(enc)


def load_model(args, prog: str, depths: list[int]):
    """asura.io.load.Loaded for --workdir/--step/--extrapolation; refuses depths the model
    cannot run (past max_iterations without extrapolation) with the fix in one line."""
    from asura.depth import DepthError, scan_length
    from asura.io.load import LoadError, load

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
