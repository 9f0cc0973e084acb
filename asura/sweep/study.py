"""A study plan: several sweeps run one after another, each reported, behind one resumable command.

    python -m asura.sweep study configs/studies/cpu.yaml [--only NAME[,NAME]] [--workers N] [--dry-run]

The plan (YAML) lists sweeps by spec file; each runs into ``<out>/<name>`` with the sweep
runner (optuna study in sqlite: a rerun skips finished trials and requeues interrupted ones), then
its REPORT.md is written under the sweep's metric and under each extra ``reports`` metric
(``REPORT_<metric>.md``), ``extrapolate`` adds EXTRAPOLATION.md (asura.sweep.extrapolation) and
``exits`` adds EXITS.md: quality against executed FLOPs under exit rules (asura.sweep.exits).
``overrides`` apply to every trial of every sweep, which is how a GPU/TPU preset scales the same
studies up. Text data named under ``prepare`` is tokenised first when missing.

``<out>/STUDIES.md`` indexes the studies with their status and the wall time this command spent on
each (summed over resumes, from ``<out>/studies.json``).

Checks, so ``--dry-run`` and a real run refuse the same plan in the same one line (exit 2), before
anything is written: ``load_plan`` checks the plan itself (keys, workers, overrides' keys, every
prepare step's builtin corpus and output path, every spec file's existence); ``check_plan`` then loads
every spec with the plan's overrides and checks that no study dir holds trials run under other
overrides. A prepare subprocess that still fails at run time is a ``PrepareFailed`` with its one-line
reason (exit 1).

    out: results                      # relative to the repo root
    workers: 2
    overrides: {}                     # dotted keys, every trial of every study
    prepare: {data/pydoc: pydoc}      # output dir -> asura.data.prepare --builtin corpus
    studies:
      - {name: demo_iso_baselines, spec: ../sweeps/iso_baselines.yaml, reports: [exact_match]}
      - {name: demo_extrapolation, spec: ../sweeps/depth_extrapolation.yaml,
         extrapolate: {factor: 4, modes: [none, last, cycle], metrics: [exact_match, ce]}}
      - {name: halting, spec: ../sweeps/halting_protocol.yaml,
         exits: {exits: ["gate:0.2,0.3"], kv: copy, primary: "halt@gate:0.3", max_flops: 0.7}}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from asura.data.prepare import BUILTINS
from asura.sweep.exits import Options as ExitOptions
from asura.sweep.extrapolation import Options
from asura.sweep.keys import SpecError, check_keys, field_type, read_yaml
from asura.sweep.manifest import REPO_ROOT, git_commit, shown_path, write_json

PLAN_KEYS = ("out", "workers", "overrides", "prepare", "studies", "description")
STUDY_KEYS = ("name", "spec", "reports", "extrapolate", "exits")
EXTRAPOLATE_KEYS = tuple(f.name for f in fields(Options))
EXITS_KEYS = tuple(f.name for f in fields(ExitOptions))
LEDGER = "studies.json"


class PrepareFailed(RuntimeError):
    """``python -m asura.data.prepare`` failed at run time; the message is its one-line reason."""


@dataclass(frozen=True)
class Study:
    name: str
    spec: Path
    reports: tuple[str, ...] = ()
    extrapolate: Options | None = None
    exits: ExitOptions | None = None


@dataclass(frozen=True)
class Plan:
    path: Path
    out: Path
    workers: int
    overrides: dict
    prepare: dict[str, str]
    studies: tuple[Study, ...] = field(default_factory=tuple)


def _extrapolate(name: str, raw) -> Options | None:
    if raw is None:
        return None
    check_keys(f"studies.{name}.extrapolate", raw, EXTRAPOLATE_KEYS)
    opts = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    problem = opts.problem()
    if problem:
        raise SpecError(f"studies.{name}.extrapolate.{problem}")
    return opts


def _exits(name: str, raw) -> ExitOptions | None:
    if raw is None:
        return None
    check_keys(f"studies.{name}.exits", raw, EXITS_KEYS)
    if not isinstance(raw.get("exits", []), list):
        raise SpecError(f'studies.{name}.exits.exits must be a list of RULE[:T,..] strings, e.g. ["gate:0.3"]')
    opts = ExitOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    problem = opts.problem()
    if problem:
        raise SpecError(f"studies.{name}.exits: {problem}")
    return opts


def _prepare_steps(raw) -> dict[str, str]:
    """prepare: {output dir: builtin corpus}, each checked as asura.data.prepare would check it at run time."""
    prepare = raw or {}
    example = "e.g. prepare: {data/pydoc: pydoc}"
    if not isinstance(prepare, dict):
        raise SpecError(f"prepare must map an output dir to a builtin corpus ({example}), got {prepare!r}")
    for out, corpus in prepare.items():
        where = f"prepare: {{{out}: {corpus}}}"
        if corpus not in BUILTINS:
            valid = ", ".join(BUILTINS.names)
            raise SpecError(f"{where}: {corpus!r} is not a builtin corpus; valid: {valid} (an output dir maps to one)")
        target = REPO_ROOT / str(out)  # relative to the repo root, like `out`
        if target.exists() and not target.is_dir():
            raise SpecError(f"{where}: {target} is an existing file; the key names a directory to write shards into")
        ancestor = next(p for p in (target, *target.parents) if p.exists())
        if not ancestor.is_dir():
            raise SpecError(f"{where}: {ancestor} is a file, so {target} cannot be created; name a directory path")
    return {str(k): str(v) for k, v in prepare.items()}


def _plan_overrides(raw) -> dict:
    overrides = raw or {}
    if not isinstance(overrides, dict):
        raise SpecError(f"overrides must map dotted config keys to values, got {overrides!r}")
    for k in overrides:
        field_type(str(k))  # the key's name now; its value is checked with each spec in check_plan
    return dict(overrides)


def load_plan(path: str | Path) -> Plan:
    """Parse and check the plan; SpecError (one line) on any bad key, value, prepare step or missing spec
    file. The specs themselves are loaded and validated by ``check_plan``."""
    path, raw = read_yaml(path, "study plan", PLAN_KEYS)
    studies, names = [], set()
    listed = raw.get("studies") or []
    if not isinstance(listed, list):
        raise SpecError(f"studies must be a list of {{name, spec, ...}} entries, got {listed!r}")
    for i, s in enumerate(listed):
        check_keys(f"studies[{i}]", s, STUDY_KEYS)
        if "name" not in s or "spec" not in s:
            raise SpecError(f"studies[{i}] needs a name and a spec, got {s!r}")
        name = str(s["name"])
        if name in names:
            raise SpecError(f"studies: duplicate name {name!r}")
        names.add(name)
        reports = s.get("reports") or []
        if not isinstance(reports, list):
            raise SpecError(f"studies.{name}.reports must be a list of metrics, got {reports!r}")
        spec = (path.parent / str(s["spec"])).resolve()
        if not spec.is_file():
            raise SpecError(f"studies.{name}.spec: sweep spec not found: {spec} (relative to the plan)")
        studies.append(Study(name, spec, tuple(map(str, reports)), _extrapolate(name, s.get("extrapolate")),
                             _exits(name, s.get("exits"))))  # fmt: skip
    if not studies:
        raise SpecError(f"study plan {path.name} lists no studies")
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise SpecError(f"workers must be an integer >= 1, got {workers!r}")
    out = raw.get("out", "results")
    if not isinstance(out, str) or not out.strip():
        raise SpecError(f"out must be a directory path (relative to the repo root), got {out!r}")
    return Plan(
        path=path,
        out=REPO_ROOT / out,
        workers=workers,
        overrides=_plan_overrides(raw.get("overrides")),
        prepare=_prepare_steps(raw.get("prepare")),
        studies=tuple(studies),
    )


def check_plan(plan: Plan, only: tuple[str, ...] = ()) -> list:
    """Load (and so validate) every spec the plan will run, and check that each study dir may be
    resumed with it (``runner.check_resume``); returns the loaded specs in order."""
    from asura.sweep.metrics import MetricError, parse_metric
    from asura.sweep.runner import check_resume
    from asura.sweep.spec import load_spec

    unknown = [n for n in only if n not in {s.name for s in plan.studies}]
    if unknown:
        raise SpecError(f"--only {unknown[0]!r} is not a study; valid: {', '.join(s.name for s in plan.studies)}")
    loaded = []
    for s in plan.studies:
        if only and s.name not in only:
            continue
        for m in s.reports:
            try:
                parse_metric(m)
            except MetricError as e:
                raise SpecError(f"studies.{s.name}.reports: {e}") from None
        try:
            spec = load_spec(s.spec, extra_overrides=plan.overrides)
            check_resume(spec, plan.out / s.name)
        except SpecError as e:
            raise SpecError(f"study {s.name}: {e}") from None
        if s.exits is not None:  # the comparison names groups this sweep has, and a reference to compare with
            group = (s.exits.primary or "").partition("@")[0]
            groups = spec.grid.groups
            if not spec.reference:
                raise SpecError(f"studies.{s.name}.exits: the sweep spec names no `reference:` group to compare with")
            if group and group not in groups:
                raise SpecError(f"studies.{s.name}.exits.primary: group {group!r} is not in the sweep; valid: "
                                f"{', '.join(groups)}")  # fmt: skip
        loaded.append((s, spec))
    return loaded


def _prepare_data(plan: Plan, say) -> None:
    for out, corpus in plan.prepare.items():
        target = REPO_ROOT / out
        if (target / "metadata.json").exists():
            continue
        say(f"preparing {out} from the builtin corpus {corpus!r}")
        cmd = [sys.executable, "-m", "asura.data.prepare", "--builtin", corpus, "--output", str(target)]
        done = subprocess.run(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
            # prepare's own errors are one "error: ..." line; a crash ends its traceback with the exception
            raise PrepareFailed(f"preparing {out} (builtin {corpus!r}) failed with exit {done.returncode}: {lines[-1]}")


def _ledger(plan: Plan) -> dict:
    p = plan.out / LEDGER
    return json.loads(p.read_text()) if p.exists() else {}


def _save_ledger(plan: Plan, ledger: dict) -> None:
    write_json(plan.out / LEDGER, ledger)


def run_plan(plan: Plan, only: tuple[str, ...] = (), workers: int | None = None, command: str = "", say=print) -> Path:
    """Run (or resume) every study of the plan in order; returns the path of STUDIES.md."""
    from asura.sweep import exits, extrapolation
    from asura.sweep.report import write_report
    from asura.sweep.runner import run_sweep

    loaded = check_plan(plan, only)  # every spec, before anything is written (none reads the shards)
    _prepare_data(plan, say)
    plan.out.mkdir(parents=True, exist_ok=True)
    ledger = _ledger(plan)
    for study, spec in loaded:
        wd = plan.out / study.name
        entry = ledger.setdefault(study.name, {"wall_s": 0.0, "runs": []})
        t0 = time.time()
        say(f"== study {study.name}: {spec.path.name} -> {wd}")
        run_sweep(spec, wd, workers=workers or plan.workers, command=f"{command}  # study {study.name}")
        for metric in study.reports:
            write_report(wd, metric)  # the default command names wd relative to the repository
        if study.extrapolate is not None:
            extrapolation.run(wd, study.extrapolate, extrapolation.command(wd, study.extrapolate), say=say)
        if study.exits is not None:
            exits.run(wd, study.exits, exits.command(wd, study.exits), say=say)
        wall = time.time() - t0
        entry["wall_s"] += wall
        entry["runs"].append({"command": command, "commit": git_commit(), "wall_s": round(wall, 1),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S %z")})  # fmt: skip
        _save_ledger(plan, ledger)
    return write_index(plan, ledger)


def write_index(plan: Plan, ledger: dict) -> Path:
    from asura.sweep.manifest import read_all

    lines = [f"# Studies: {plan.path.name}", "", f"Plan: `{shown_path(plan.path)}`.", ""]
    lines += ["| study | spec | trials complete | trial time (summed) | wall time (this command) | reports |"]
    lines += ["|---|---|---|---|---|---|"]
    total = trials_total = 0.0
    for s in plan.studies:
        wd = plan.out / s.name
        ms = read_all(wd) if wd.is_dir() else []
        done = sum(m["status"] == "complete" for m in ms)
        wall = float(ledger.get(s.name, {}).get("wall_s", 0.0))
        trial_s = sum(float(m.get("wall_s") or 0.0) for m in ms)  # however the trials were launched
        total += wall
        trials_total += trial_s
        reports = [p.name for p in sorted(wd.glob("*.md")) if p.name.startswith(("REPORT", "EXTRAPOLATION", "EXITS"))]
        links = ", ".join(f"[{r}]({s.name}/{r})" for r in reports) or "-"
        spec = shown_path(s.spec)
        row = f"| {s.name} | `{spec}` | {done}/{len(ms)} | {trial_s / 60:.1f} min | {wall / 60:.1f} min | {links} |"
        lines.append(row)
    lines += [
        "",
        f"Wall time of this command, all resumes: {total / 60:.1f} min ({total:.0f} s). Trial time summed over "
        f"every trial: {trials_total / 60:.1f} min (workers run trials side by side, and trials started by a "
        "plain sweep command count here too).",
        "",
    ]
    path = plan.out / "STUDIES.md"
    path.write_text("\n".join(lines))
    return path
