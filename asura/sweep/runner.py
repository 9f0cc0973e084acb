"""Optuna study, workers and trial execution.

Grid sweeps: every cell (variant × axes × seed, plus derived baselines) is a trial
enqueued with its cell key in user_attrs; workers pop the queue (``study.optimize``
pops waiting trials first). Resuming enqueues only the cells with no COMPLETE, PRUNED,
WAITING or RUNNING trial and no complete record (DIR/records, committed with a study: see
asura.sweep.manifest), so finished cells never rerun, even on another machine without the optuna
database, and failed or interrupted ones do.
A worker killed without cleanup leaves its trial RUNNING; optuna's heartbeat marks it
FAIL after ``GRACE_S`` and ``RetryHeartbeatStaleTrialCallback`` requeues it, or ``--fail-running``
does so at once when you know no other worker is alive.

Search sweeps: TPE/random sampling until ``n_trials`` trials are COMPLETE or PRUNED
(``MaxTrialsCallback``), counted across invocations and workers.

Pruning: each eval's metric is reported with the eval index as the step, so the
PercentilePruner compares trials at equal training progress (same eval_every).

The metric is read at metric@depth or the trial's training depth, never at another depth:
an eval without that depth fails the trial (``MetricMissing``) with a one-line reason.

Progress: one stdout line per trial start, finish, prune or failure (asura.sweep.progress); optuna's
INFO log and its per-trial failure warnings (a traceback each) are silenced because those lines say it.

Resuming: a sweep dir records the spec's ``extra_overrides`` (study preset, command line) in sweep.json
and every manifest; ``check_resume`` refuses (one line, before anything is written) to add trials
under other ones, since cells are keyed by their arm, not their config, and would silently mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import shlex
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from asura.config.load import with_overrides
from asura.config.schema import Config
from asura.depth import eval_depths
from asura.sweep import manifest
from asura.sweep.keys import SpecError, format_overrides, override_args
from asura.sweep.metrics import MetricMissing, metric_value
from asura.sweep.progress import Say, TrialLine, say_flushed
from asura.sweep.spec import Cell, Grid, SweepSpec, field_type, load_spec
from asura.sweep.trainer import TrialFn, subprocess_trial
from asura.sweep.tuning import choose, tuned, tuning_cells

HEARTBEAT_S = 10
GRACE_S = 60
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)


class _OptunaTrialLog(logging.Filter):
    """Drops optuna's "Trial N failed ..." warnings (each with a traceback): the progress line says why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trial ")


_TRIAL_LOG = _OptunaTrialLog()


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "study created", "trial finished": progress lines
    trial_log = logging.getLogger("optuna.study._optimize")  # where optuna logs a failed trial
    if _TRIAL_LOG not in trial_log.filters:
        trial_log.addFilter(_TRIAL_LOG)


class ResumeRefused(SpecError):
    """A sweep dir holds trials run under other extra overrides; one line."""


def default_workdir(spec: SweepSpec) -> Path:
    return Path("runs") / "sweeps" / spec.study_name


def storage_url(spec: SweepSpec, workdir: Path) -> str:
    return spec.storage or f"sqlite:///{(workdir / 'study.db').resolve()}"


def make_storage(url: str) -> RDBStorage:
    """The study's RDB storage. On sqlite every transaction is ``BEGIN IMMEDIATE``.

    Why: Python's sqlite3 opens a transaction only at the first write, so optuna's pop of a waiting
    trial (read WAITING, then write RUNNING) is not atomic across processes: two workers could both
    read WAITING and both run the same trial (seen under load: one train.py refused by the other's
    workdir lock, then the trial failed under its winner). Taking the write lock when the
    transaction begins makes the read-check-write one step; the busy timeout lets workers queue.
    """
    sqlite = url.startswith("sqlite")
    # isolation_level=None: the driver leaves transactions to us (the "begin" hook below).
    engine = {"connect_args": {"timeout": 120, "isolation_level": None}} if sqlite else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" in optuna; they are what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    if sqlite:
        from sqlalchemy import event

        event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def open_study(spec: SweepSpec, workdir: Path) -> optuna.Study:
    _quiet_optuna()
    storage = make_storage(storage_url(spec, workdir))
    # A grid's sampler is never consulted (its trials are enqueued); a search's is its method's.
    sampler = optuna.samplers.RandomSampler(seed=0) if spec.search is None else spec.search.sampler()
    p = spec.pruner
    pruner = (
        optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_evals)
        if p
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=storage,
        study_name=spec.study_name,
        sampler=sampler,
        pruner=pruner,
        direction=spec.metric.direction,
        load_if_exists=True,
    )


def cell_info(cell: Cell) -> dict:
    return {k: getattr(cell, k) for k in ("key", "group", "seed", "role", "parent", "overrides", "aliases")}


class Resolved(NamedTuple):
    config: Config
    info: dict  # cell_info: key, group, seed, role, parent, overrides, aliases


class _Idle(RuntimeError):
    """A worker's fresh trial found no grid cell left (another worker took the last one)."""


class Objective:
    def __init__(self, spec: SweepSpec, workdir: Path, trial_fn: TrialFn | None = None, say: Say = say_flushed):
        self.spec, self.workdir, self.say = spec, workdir, say
        self.trial_fn = trial_fn or subprocess_trial
        self.cells = {c.key: c for c in spec.grid.cells}
        self.place = {key: i + 1 for i, key in enumerate(self.cells)}  # k of "trial k/N": stable across resumes

    def _line(self, trial: optuna.Trial, key: str) -> TrialLine:
        if self.spec.search is None:
            return TrialLine(self.place[key], len(self.cells), key)
        return TrialLine(trial.number + 1, self.spec.search.n_trials, key)

    def _claim(self, trial: optuna.Trial) -> str:
        # Only reached when the queue emptied between a worker's check and its ask().
        taken = {t.user_attrs.get("cell") for t in trial.study.get_trials(deepcopy=False, states=CLAIMED)}
        for key in self.cells:
            if key not in taken:
                trial.set_user_attr("cell", key)
                return key
        trial.set_user_attr("idle", True)
        raise _Idle("no grid cell left for this worker")

    def _resolve(self, trial: optuna.Trial) -> Resolved:
        if self.spec.search is None:
            key = trial.user_attrs.get("cell") or self._claim(trial)
            cell = self.cells[key]
            return Resolved(cell.config, cell_info(cell))
        params = {p.key: p.suggest(trial) for p in self.spec.search.params}
        seed = self.spec.seeds[0]
        cfg = with_overrides(self.spec.base_config, {**params, "train.seed": seed})
        short = ",".join(
            f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        group = f"#{trial.number}:{short}"
        trial.set_user_attr("cell", f"{group}|seed={seed}")
        info = {"key": f"{group}|seed={seed}", "group": group, "seed": seed, "role": "trial", "parent": None}
        return Resolved(cfg, {**info, "overrides": params, "aliases": ()})

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, info = self._resolve(trial)
        wd = manifest.trial_dir(self.workdir, trial.number)
        metric = self.spec.metric
        evals: list[tuple[int, dict]] = []
        reported: list[float] = []

        def on_eval(step: int, depths: dict) -> None:
            evals.append((step, depths))
            value = metric_value(metric, cfg.model.iterations, depths)  # MetricMissing fails the trial
            reported.append(value)
            trial.report(value, len(reported) - 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval {len(reported) - 1} (step {step}): {metric.label}={value:.4g}")

        status, value, final, steps_done, error = "interrupted", None, None, None, None
        line = self._line(trial, info["key"])
        self.say(line.started(info["role"], info["overrides"], info["parent"]))
        t0 = time.perf_counter()
        try:
            if metric.depth is not None and metric.depth not in eval_depths(cfg):
                # The spec checked each searched value alone; a combination can still drop the depth.
                raise MetricMissing(
                    f"{metric.label}: this trial evaluates depths {eval_depths(cfg)}, not {metric.depth}"
                )
            result = self.trial_fn(cfg, wd, on_eval)
            final, steps_done = result["final"], result.get("step", cfg.train.steps)
            value = metric_value(metric, cfg.model.iterations, final)
            if not math.isfinite(value):
                raise RuntimeError(f"{metric.label} is not finite in the final eval: {value}")
            status = "complete"
            return value
        except optuna.TrialPruned as e:
            status = "pruned"
            self.say(line.pruned(str(e), time.perf_counter() - t0))
            raise
        except Exception as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            self.say(line.failed(error, time.perf_counter() - t0))
            raise
        finally:
            if status != "complete":
                final = evals[-1][1] if evals else None
                steps_done = evals[-1][0] if evals else 0
                value = reported[-1] if reported else None
            wall_s = time.perf_counter() - t0
            m = manifest.build(
                trial=trial.number, cell=info, cfg=cfg, status=status, metric=metric.label, value=value,
                evals=evals, final=final, steps_done=steps_done, wall_s=wall_s, error=error,
                extra_overrides=self.spec.extra_overrides, train=manifest.train_curve(wd, [s for s, _ in evals]),
            )  # fmt: skip
            manifest.write(wd, m)
            manifest.write_record(self.workdir, m)  # the committed copy: reports read these
            if status == "complete":
                self.say(line.finished(metric.label, value, wall_s))


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _stop_when_queue_empty(study: optuna.Study, _trial) -> None:
    if _waiting(study) == 0:
        study.stop()


def _plain(overrides: dict) -> dict:
    return json.loads(json.dumps(overrides))  # as sweep.json holds them: tuples are lists


def check_resume(spec: SweepSpec, workdir: Path) -> None:
    """ResumeRefused (one line) when ``workdir`` was prepared under other extra overrides than ``spec``'s."""
    from asura.sweep.report import read_meta

    meta = read_meta(workdir)
    if not meta:  # a new sweep dir
        return
    before = meta.get("extra_overrides", {})  # a dir written before overrides were recorded had none
    if before != _plain(spec.extra_overrides):
        raise ResumeRefused(
            f"sweep dir {workdir} was run with overrides {format_overrides(before)}, not "
            f"{format_overrides(spec.extra_overrides)}: pass the same overrides to resume it, or sweep into "
            "another dir"
        )
    tune = spec.tune.to_json() if spec.tune is not None else None
    if "tune" in meta and meta["tune"] != tune:
        raise ResumeRefused(
            f"sweep dir {workdir} tuned the lr with tune={meta['tune']}, not {tune}: a changed tuning grid is a "
            "new study; sweep into another dir"
        )
    registered = meta.get("protocol")
    now = spec.protocol.to_json() if spec.protocol is not None else None
    if registered is not None and registered.get("protocol") != now:
        raise ResumeRefused(
            f"sweep dir {workdir} registered another protocol ({registered.get('protocol')}) at commit "
            f"{registered.get('commit')}: a changed protocol is a new study; sweep into another dir"
        )


def prepare(
    spec: SweepSpec, workdir: Path, fail_running: bool = False, command: str | None = None, say: Say = say_flushed
) -> optuna.Study:
    """Create/load the study, requeue interrupted trials and enqueue every unfinished grid cell.

    ``command`` (how this invocation was asked for) is appended to sweep.json's ``commands`` with
    the git commit and time, so REPORT.md can say what produced the trials. ``ResumeRefused`` before
    anything is written when the dir holds a sweep with other extra overrides.
    """
    from asura.sweep.report import read_meta

    check_resume(spec, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    commands = read_meta(workdir).get("commands", [])
    if command is not None:
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        commands = [*commands, {"command": command, "commit": manifest.git_commit(), "started": started}]
    study = open_study(spec, workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # heartbeat-stale RUNNING trials -> FAIL -> requeued by the callback
    if fail_running:
        storage = study._storage  # public BaseStorage API on the storage we built in open_study
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    taken = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=CLAIMED)}
    recorded = manifest.done_cells(workdir, spec.grid.cells)  # complete in the committed records
    for cell in spec.grid.cells:
        if cell.key not in taken and cell.key not in recorded:
            study.enqueue_trial({}, user_attrs={"cell": cell.key})
    finished = study.get_trials(deepcopy=False, states=DONE)
    if spec.search is None:
        keys = {c.key for c in spec.grid.cells}  # this phase's: the study also holds the tuning phase's trials
        done_here = {t.user_attrs.get("cell") for t in finished} & set(taken) & keys
        total, done = len(spec.grid.cells), len(done_here | recorded)
    else:
        total, done = spec.search.n_trials, len(finished)
    say(f"sweep {spec.study_name}: {total} trials, {done} done, {max(total - done, 0)} to run -> {workdir}")
    meta = {
        "spec": str(spec.path),
        "study_name": spec.study_name,
        "storage": storage_url(spec, workdir),
        "metric": spec.metric.label,
        "direction": spec.metric.direction,
        "reference": spec.reference,
        "groups": list(spec.grid.groups),
        "impossible": [dataclasses.asdict(i) for i in spec.grid.impossible],
        "extra_overrides": _plain(spec.extra_overrides),  # study preset + command line, every trial
        "commands": commands,
        "tune": spec.tune.to_json() if spec.tune is not None else None,
    }
    before = read_meta(workdir).get("protocol")
    if before is not None:
        meta["protocol"] = before  # as first registered
    elif spec.protocol is not None:
        meta["protocol"] = {
            "protocol": spec.protocol.to_json(),
            "commit": manifest.git_commit(),
            "registered": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "complete_before": len(recorded | {t.user_attrs.get("cell") for t in finished}),
        }
    (workdir / "sweep.json").write_text(json.dumps(meta, indent=1))
    return study


def work(spec: SweepSpec, workdir: Path, trial_fn: TrialFn | None = None, max_trials: int | None = None) -> None:
    """One worker: run trials until the grid queue is empty or the search has n_trials done."""
    study = open_study(spec, workdir)
    objective = Objective(spec, workdir, trial_fn)
    if spec.search is None:
        if _waiting(study):
            study.optimize(objective, n_trials=max_trials, callbacks=[_stop_when_queue_empty], catch=(Exception,))
        return
    n = spec.search.n_trials
    left = n - len(study.get_trials(deepcopy=False, states=DONE))
    if max_trials is not None:
        left = min(left, max_trials)
    if left > 0:
        cb = MaxTrialsCallback(n, states=DONE)
        study.optimize(objective, n_trials=left, callbacks=[cb], catch=(Exception,))


def cli_command(
    spec: SweepSpec, workdir: Path, workers: int, baselines: bool, max_trials: int | None, fail_running: bool
) -> str:
    """The ``python -m asura.sweep`` command equivalent to these run_sweep arguments."""
    args = ["python", "-m", "asura.sweep", str(spec.path), *override_args(spec.extra_overrides)]
    args += ["--workdir", str(workdir)]
    if workers != 1:
        args += ["--workers", str(workers)]
    if baselines:
        args += ["--baselines"]
    if max_trials is not None:
        args += ["--max-trials", str(max_trials)]
    if fail_running:
        args += ["--fail-running"]
    return shlex.join(args)


def _run_phase(spec: SweepSpec, wd: Path, workers, trial_fn, max_trials, fail_running, command) -> None:
    prepare(spec, wd, fail_running, command)
    if workers <= 1:
        work(spec, wd, trial_fn, max_trials)
    else:
        ctx = multiprocessing.get_context("spawn")  # fork after importing JAX/optuna threads is unsafe
        # The loaded spec (grid included) is pickled to each worker rather than rebuilt there.
        procs = [ctx.Process(target=work, args=(spec, wd, trial_fn, max_trials)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()


def run_sweep(
    spec: str | Path | SweepSpec,
    workdir: str | Path | None = None,
    *,
    workers: int = 1,
    baselines: bool = False,
    trial_fn: TrialFn | None = None,
    max_trials: int | None = None,
    fail_running: bool = False,
    report: bool = True,
    command: str | None = None,
) -> Path:
    """Validate the spec, run (or resume) the sweep, write the report; returns the sweep dir.

    ``spec`` is a path or an already loaded spec (then ``baselines`` is ignored: it was applied
    at load). ``max_trials`` caps the trials this invocation runs (per worker). ``trial_fn``
    replaces training (tests); with workers > 1 it must be a picklable top-level function.
    ``command`` is recorded in sweep.json (the CLI passes its argv); default: the equivalent CLI
    command, marked when ``trial_fn`` replaced training.
    """
    if isinstance(spec, SweepSpec):
        baselines = False  # applied at load: the spec's path and file say the rest
    else:
        spec = load_spec(spec, baselines)  # every trial config validated before anything runs
    wd = Path(workdir) if workdir is not None else default_workdir(spec)
    if command is None:
        command = cli_command(spec, wd, workers, baselines, max_trials, fail_running)
        if trial_fn is not None:
            command += f"  # in-process, trial_fn={getattr(trial_fn, '__qualname__', trial_fn)} instead of train.py"
    if spec.tune is not None:  # phase 1: every group x lr x tuning seed; phase 2 trains at each group's best lr
        phase = dataclasses.replace(spec, grid=Grid(tuning_cells(spec.grid.cells, spec.tune)))
        _run_phase(phase, wd, workers, trial_fn, max_trials, fail_running, command)
        chosen = choose(manifest.read_all(wd), spec.tune, spec.metric.direction)
        missing = [g for g in spec.grid.groups if g not in chosen]
        if missing:
            say_flushed(f"sweep {spec.study_name}: lr tuning incomplete for {', '.join(missing)}: rerun to finish it")
            spec = None
        else:
            say_flushed("lr tuned per group: " + ", ".join(f"{g} {c['lr']:g}" for g, c in chosen.items()))
            spec = dataclasses.replace(spec, grid=Grid(tuned(spec.grid.cells, chosen), spec.grid.impossible))
        command = None  # recorded by the first phase: one invocation, one entry in sweep.json's commands
    if spec is not None:
        _run_phase(spec, wd, workers, trial_fn, max_trials, fail_running, command)
    if (wd / manifest.RECORDS).exists():
        manifest.add_train_curves(wd)  # records written before they carried the train curve
    if report:
        from asura.sweep.report import EmptySweep, write_report

        with contextlib.suppress(EmptySweep):  # no trial ran in this dir yet (--max-trials 0): nothing to tabulate
            write_report(wd)
    return wd


__all__ = [
    "Objective", "ResumeRefused", "check_resume", "field_type", "make_storage", "metric_value", "open_study", "prepare",
    "run_sweep", "work",
]  # fmt: skip
