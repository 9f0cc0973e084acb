"""Shared CLI parsing: `--config FILE [--workdir DIR] [key=value ...]`.

Bad input exits with code 2 and a one-line message before any JAX import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from asura.config.load import ConfigError, load_config
from asura.config.schema import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def fail(message: str, prog: str = "asura") -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see --help", self.prog)


def parse_config_args(
    argv: list[str] | None,
    prog: str,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a validated Config plus the remaining flags."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=256")
    if extra is not None:
        extra(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may sit on either side of the flags
    for o in args.overrides:
        if o.startswith("-"):
            fail(f"unknown flag {o!r}; see --help", prog)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        fail(str(e), prog)
    return cfg, args
