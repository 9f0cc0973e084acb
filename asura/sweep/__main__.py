"""CLI: ``python -m asura.sweep SPEC.yaml [--workdir DIR] [--workers N] [--baselines]``
and ``python -m asura.sweep report DIR``.

A bad spec (unknown key, bad dotted key, any trial config that fails validation) exits 2
with one line before any study or training starts.
"""

from __future__ import annotations

import argparse
import sys

from asura.config.cli import fail
from asura.sweep.spec import SpecError

PROG = "python -m asura.sweep"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog=f"{PROG} report", description="Rebuild tables and plots of a sweep dir.")
        p.add_argument("workdir")
        args = p.parse_args(argv[1:])
        from asura.sweep.report import write_report

        out = write_report(args.workdir)
        print("\n".join(str(f) for f in out["files"]))
        return
    p = argparse.ArgumentParser(prog=PROG, description="Run or resume an optuna sweep of asura training runs.")
    p.add_argument("spec", help="sweep spec YAML (see asura/sweep/spec.py)")
    p.add_argument("--workdir", help="sweep dir (default runs/sweeps/<study_name>)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    p.add_argument("--baselines", action="store_true", help="add iso-param/iso-FLOP baselines of looped trials")
    p.add_argument("--max-trials", type=int, help="run at most this many trials now (per worker); rerun to resume")
    p.add_argument("--fail-running", action="store_true", help="requeue RUNNING trials now (no other worker alive)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and list the trials, run nothing")
    args = p.parse_args(argv)
    if args.workers < 1:
        fail(f"--workers must be >= 1, got {args.workers}", PROG)
    from asura.sweep.runner import run_sweep
    from asura.sweep.spec import grid_cells, load_spec

    try:
        spec = load_spec(args.spec, args.baselines)
    except SpecError as e:
        fail(str(e), PROG)
    if args.dry_run:
        if spec.search is not None:
            print(
                f"search: {spec.search['method']}, {spec.search['n_trials']} trials over {list(spec.search['params'])}"
            )
            return
        cells, impossible = grid_cells(spec)
        for c in cells:
            print(f"{c.key}  [{c.role}]" + (f"  aliases={list(c.aliases)}" if c.aliases else ""))
        for i in impossible:
            print(f"{i['group']}  [impossible] {i['reason']}")
        return
    wd = run_sweep(
        args.spec, args.workdir, workers=args.workers, baselines=args.baselines,
        max_trials=args.max_trials, fail_running=args.fail_running,
    )  # fmt: skip
    print(f"sweep dir: {wd}\nsummary: {wd / 'summary.md'}")


if __name__ == "__main__":
    main()
