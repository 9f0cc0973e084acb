"""CLI: ``python -m asura.sweep SPEC.yaml [key=value ...] [--workdir DIR] [--workers N] [--baselines]``,
``python -m asura.sweep report DIR [--metric NAME[@DEPTH]]``,
``python -m asura.sweep study PLAN.yaml [--only NAMES] [--workers N] [--dry-run]`` (asura.sweep.study)
``python -m asura.sweep extrapolate DIR [--factor K] [--modes M,..]`` (asura.sweep.extrapolation)
and ``python -m asura.sweep exits DIR --exit RULE[:T,..] [--kv copy|full]`` (asura.sweep.exits).

``key=value`` overrides (train.py's syntax) apply to the base config of every trial and are recorded in
sweep.json and each manifest; a sweep dir is only resumed with the same ones.

Every refusal is one line on stderr and exit 2, before any study or training starts and
before anything is written: a bad flag, override or missing argument, a bad spec (unknown key, bad
dotted key, any trial config that fails validation), a resume under other overrides, a report dir
with no trials, a report metric that cannot be read or compared across the trials (``objective``
over runs with different guidance), a study plan with a bad prepare step.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, NoReturn

from asura.config.cli import fail
from asura.sweep.keys import SpecError, format_overrides
from asura.sweep.tuning import tuning_cells

PROG = "python -m asura.sweep"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see --help", self.prog)


def local_dir(path: str | None, prog: str) -> str | None:
    """Sweep dirs stay local: they hold an sqlite study database, which needs a POSIX filesystem
    (locks, in-place writes); a gs:// path is refused in one line rather than becoming `gs:/...`."""
    from asura.storage.paths import is_remote

    if path is not None and is_remote(path):
        fail(f"{path}: sweep and study dirs must be local (their optuna study is an sqlite file); trials' "
             "checkpoints stay under it too", prog)  # fmt: skip
    return path


def _command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "asura.sweep", *argv])


def _report(argv: list[str]) -> None:
    p = _Parser(prog=f"{PROG} report", description=SUBCOMMANDS["report"].summary)
    p.add_argument("workdir")
    p.add_argument("--metric", help="tabulate another registered metric[@depth] (default: the sweep's)")
    args = p.parse_args(argv)
    local_dir(args.workdir, p.prog)
    from asura.sweep.report import EmptySweep, ReportRefused, write_report

    try:
        out = write_report(args.workdir, args.metric, command=_command(["report", *argv]))
    except (EmptySweep, ReportRefused) as e:
        fail(str(e), p.prog)
    print("\n".join(str(f) for f in out["files"]))


def _study(argv: list[str]) -> None:
    p = _Parser(prog=f"{PROG} study", description=SUBCOMMANDS["study"].summary)
    p.add_argument("plan", help="study plan YAML (configs/studies/*.yaml; see asura/sweep/study.py)")
    p.add_argument("--only", default="", help="comma-separated study names to run (default: all)")
    p.add_argument("--workers", type=int, help="worker processes per sweep (default: the plan's)")
    p.add_argument("--dry-run", action="store_true", help="validate the plan and every spec, run nothing")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        fail(f"--workers must be >= 1, got {args.workers}", p.prog)
    from asura.sweep.study import PrepareFailed, check_plan, load_plan, run_plan

    only = tuple(n for n in args.only.split(",") if n)
    try:
        plan = load_plan(args.plan)
        if args.dry_run:
            for study, spec in check_plan(plan, only):
                tuning = f" + {len(tuning_cells(spec.grid.cells, spec.tune))} lr-tuning trials" if spec.tune else ""
                print(f"{study.name}: {len(spec.grid.cells)} trials{tuning} -> {plan.out / study.name}")
            return
        index = run_plan(plan, only, args.workers, command=_command(["study", *argv]))
    except SpecError as e:
        fail(str(e), p.prog)
    except PrepareFailed as e:  # the plan was valid; the corpus could not be written now (exit 1, not 2)
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"index: {index}")


def _extrapolate(argv: list[str]) -> None:
    from asura.sweep import extrapolation
    from asura.sweep.extrapolation import METRICS, MODES, Options

    d = Options()
    p = _Parser(prog=f"{PROG} extrapolate", description=SUBCOMMANDS["extrapolate"].summary)
    p.add_argument("workdir")
    p.add_argument("--factor", type=int, default=d.factor, help=f"depths 1 .. factor x trained depth ({d.factor})")
    p.add_argument("--modes", default=",".join(d.modes), help=f"extrapolation modes, from {', '.join(MODES)}")
    p.add_argument("--metrics", default=",".join(d.metrics), help=f"tabulated metrics, from {', '.join(METRICS)}")
    p.add_argument("--batches", type=int, help="eval batches per trial (default: each trial's train.eval_batches)")
    args = p.parse_args(argv)
    local_dir(args.workdir, p.prog)
    opts = Options(args.factor, tuple(args.modes.split(",")), tuple(args.metrics.split(",")), args.batches)
    problem = opts.problem()
    if problem:
        fail(f"--{problem}", p.prog)
    from asura.sweep.report import EmptySweep

    try:
        print(extrapolation.run(args.workdir, opts, command=_command(["extrapolate", *argv])))
    except EmptySweep as e:
        fail(str(e), p.prog)


def _exits(argv: list[str]) -> None:
    from asura.sweep import exits

    d = exits.Options()
    p = _Parser(prog=f"{PROG} exits", description=SUBCOMMANDS["exits"].summary)
    p.add_argument("workdir")
    p.add_argument("--exit", action="append", default=[], metavar="RULE[:T1,T2]",
                   help="an exit rule (asura.model.exits) and thresholds, as asura.evaluate --exit")  # fmt: skip
    p.add_argument("--kv", default=d.kv, help="what others read from an exited token: copy | full")
    p.add_argument("--batches", type=int, help="eval batches per trial (default: each trial's train.eval_batches)")
    p.add_argument("--primary", help="the pre-registered comparison, GROUP@RULE:T, against the reference's full depth")
    p.add_argument("--max-flops", type=float, default=d.max_flops, help="the primary's FLOPs bar (a fraction)")
    args = p.parse_args(argv)
    local_dir(args.workdir, p.prog)
    opts = exits.Options(tuple(args.exit), args.kv, args.batches, args.primary, args.max_flops)
    problem = opts.problem()
    if problem:
        fail(problem, p.prog)
    from asura.sweep.report import EmptySweep

    try:
        print(exits.run(args.workdir, opts, command=_command(["exits", *argv])))
    except EmptySweep as e:
        fail(str(e), p.prog)


class Subcommand(NamedTuple):
    run: Callable[[list[str]], None]
    args: str  # what follows the name, for the --help list
    summary: str  # one line: the subcommand's description and its --help entry


SUBCOMMANDS = {
    "report": Subcommand(_report, "DIR", "rebuild tables, plots and REPORT.md of a sweep dir"),
    "extrapolate": Subcommand(_extrapolate, "DIR", "evaluate a sweep's checkpoints past their trained depth"),
    "exits": Subcommand(_exits, "DIR", "quality against executed FLOPs under exit rules, with the Pareto plot"),
    "study": Subcommand(_study, "PLAN.yaml", "run (or resume) every sweep of a study plan, with reports"),
}


def _subcommand_help() -> str:
    rows = [(f"{name} {sub.args}", sub.summary) for name, sub in SUBCOMMANDS.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {PROG} {head:<{width}}  {summary}" for head, summary in rows]
    return "subcommands (each takes --help):\n" + "\n".join(lines)


def _dry_run(spec) -> None:
    if spec.extra_overrides:
        print(f"overrides (every trial): {format_overrides(spec.extra_overrides)}")
    if spec.search is not None:
        s = spec.search
        print(f"search: {s.method}, {s.n_trials} trials over {[p.key for p in s.params]}; metric {spec.metric.label}")
        return
    tuning = tuning_cells(spec.grid.cells, spec.tune) if spec.tune else ()
    for c in (*tuning, *spec.grid.cells):  # the run's order: the lr-tuning phase first
        print(f"{c.key}  [{c.role}]" + (f"  aliases={list(c.aliases)}" if c.aliases else ""))
    for i in spec.grid.impossible:
        print(f"{i.group}  [impossible] {i.reason}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]].run(argv[1:])
        return
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} SPEC.yaml [key=value ...] [options]  |  {PROG} {{{','.join(SUBCOMMANDS)}}} ...",
        description="Run or resume an optuna sweep of asura training runs.",
        epilog=_subcommand_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="sweep spec YAML (see asura/sweep/spec.py)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides for every trial's base config, as train.py takes them")  # fmt: skip
    p.add_argument("--workdir", help="sweep dir (default runs/sweeps/<study_name>)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    p.add_argument("--baselines", action="store_true", help="add the default baselines of looped trials")
    p.add_argument("--max-trials", type=int, help="run at most this many trials now (per worker); rerun to resume")
    p.add_argument("--fail-running", action="store_true", help="requeue RUNNING trials now (no other worker alive)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and list the trials, run nothing")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.workers < 1:
        fail(f"--workers must be >= 1, got {args.workers}", PROG)
    if args.max_trials is not None and args.max_trials < 0:
        fail(f"--max-trials must be >= 0, got {args.max_trials}", PROG)
    from asura.sweep.runner import check_resume, default_workdir, run_sweep
    from asura.sweep.spec import load_spec

    try:
        spec = load_spec(args.spec, args.baselines, cli_overrides=args.overrides)
        workdir = Path(local_dir(args.workdir, PROG)) if args.workdir is not None else default_workdir(spec)
        check_resume(spec, workdir)
    except SpecError as e:
        fail(str(e), PROG)
    if args.dry_run:
        _dry_run(spec)
        return
    wd = run_sweep(
        spec, workdir, workers=args.workers, max_trials=args.max_trials, fail_running=args.fail_running,
        command=_command(argv),
    )  # fmt: skip
    print(f"sweep dir: {wd}\nsummary: {wd / 'summary.md'}")


if __name__ == "__main__":
    main()
