"""The training loop: `run(cfg, workdir) -> summary dict`, callable in-process.

Read it top-down like nanodo's train.py: `run` builds a `Trainer` and calls its named
sub-actions: `build_state`, `restore`, then per step `train_step`, `log`, `evaluate`,
`checkpoint`. Host syncs happen only at those points, never between steps.

Workdir layout::

    workdir/
      config.yaml        resolved config of this run (written atomically; each checkpoint's own
                         saved config is the authority on resume)
      metrics.jsonl      one JSON record per log/eval step (``step``, ``time``, ``train/*``, ``eval/*``)
      checkpoints/<step>/{state,data,meta}   orbax steps: last train.keep_checkpoints + best eval ce
      checkpoints_bad/   steps that failed to restore, moved aside on resume
      tb/                TensorBoard event files (train.tensorboard)

Resume is automatic from the newest intact checkpoint; metrics.jsonl records past it are
dropped. The config may differ from the checkpoint's only in `checkpoint.HARMLESS_KEYS`, and in
train.steps when no trained step's lr changes (`extend`, asura.train.resume). The checkpoint's
config is checked before the workdir is locked or any log is opened.

Statuses: "done"; "preempted" after SIGTERM/SIGINT (a checkpoint is saved first); "stopped"
when an injected `Hooks.after_step` asks to stop. `train.max_nan_steps` consecutive
non-finite steps raise NonFiniteError without saving (the last checkpoint stays good).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from asura.config import Config
from asura.flops import param_count
from asura.storage.paths import to_path
from asura.train import init_from
from asura.train.metrics import to_python
from asura.train.optim import freezes, trained_mask
from asura.train.preflight import preflight
from asura.train.resume import plan_resume
from asura.train.state import count_params
from asura.train.trainer import Hooks, NonFiniteError, Trainer
from asura.train.workdir import Signals, agreed, make_workdir, workdir_lock

# Tests and quick experiments: ~3x faster XLA:CPU compiles, slower steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
__all__ = ["FAST_COMPILE", "Hooks", "NonFiniteError", "run"]


def run(
    cfg: Config,
    workdir: str | Path,
    *,
    hooks: Hooks | None = None,
    install_signal_handlers: bool = True,
    say: Callable[[str], None] | None = None,
    compiler_options: dict | None = None,
    extend: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) `cfg` in `workdir`. Returns a summary dict (see the end of this function).

    compiler_options: XLA options for the jitted steps, e.g. FAST_COMPILE for tests.
    say: where one-line messages go (default: stderr above the progress bar).
    extend: "continue" | "rewarm" when train.steps differs from the checkpoint's (asura.train.resume).
    """
    t_start = time.time()
    # Multi-process: only orbax's coordinated preemption sync may trigger a save (a local
    # flag on one host would deadlock the others), so the handlers are single-process only.
    installed = install_signal_handlers and jax.process_count() == 1 and Signals.install()
    workdir = to_path(workdir)  # a local directory or gs://bucket/prefix
    try:
        preflight(cfg, workdir)  # data, workdir, devices, memory: before any compilation
        lock = workdir_lock(workdir, jax.process_index())  # process 0 holds it for the whole job
        agreed(lock.check_free, workdir)  # a busy workdir is refused first, and without touching it
        plan = plan_resume(cfg, workdir, extend)  # the checkpoint's config decides: before anything is opened
        if plan.saved is None:  # a fresh run: the source is resolved, checked and pinned here
            source = init_from.resolve(plan.cfg)
            cfg = init_from.pinned(plan.cfg, source)
        else:  # a resume continues its own checkpoint and keeps the step it started from, as saved
            source, cfg = None, init_from.kept(plan.cfg, plan.saved.cfg)
        make_workdir(workdir)
        agreed(lock.__enter__, workdir)
        with contextlib.closing(lock):
            tell = say or (lambda m: print(m, file=sys.stderr))
            if Signals.received is not None:  # signalled during imports: nothing started, nothing to save
                tell(f"signal {Signals.received} before the first step: exiting")
                return {"status": "preempted", "step": 0, "resumed_from": None, "eval": {}, "train": {},
                        "wall_s": time.time() - t_start, "params": None, "nan_total": 0, "cfg": cfg}  # fmt: skip
            for note in plan.notes:
                tell(note)
            if getattr(lock, "took_over", None):
                tell(f"took over the stale lock of workdir {workdir} ({lock.took_over})")
            trainer = Trainer(
                cfg, workdir, say=say, compiler_options=compiler_options, hooks=hooks or Hooks(), lock=lock,
                init_source=source,
            )  # fmt: skip
            try:
                status, start, step_done = _run(trainer)
            finally:
                trainer.close()
    finally:
        if installed:
            Signals.restore()
    state = trainer.state
    return {
        "cfg": cfg,  # the config trained with (an extended run's schedule events included)
        "status": status,
        "step": step_done,
        "resumed_from": start,
        "n_params": count_params(state["params"]) if state is not None else None,
        "train": {k: to_python(v) for k, v in trainer.last_train.items()},
        "eval": trainer.last_eval,
        "final_objective": trainer.last_train.get("train/objective"),
        "exact_match": trainer.last_eval.get("eval/exact_match"),
        "nan_total": int(jax.device_get(state["nan_total"])) if state is not None else 0,
        "wall_s": time.time() - t_start,
        "params": state["params"] if state is not None else None,
    }


def _run(trainer: Trainer) -> tuple[str, int | None, int]:
    """build -> restore -> train (or report a finished run); returns (status, resumed_from, step)."""
    cfg = trainer.cfg
    trainer.build_state()
    start = trainer.restore()
    if Signals.received is not None:  # signalled while compiling/restoring: the workdir is as it was
        trainer.say(f"signal {Signals.received} before the first step: exiting")
        return "preempted", start, start or 0
    trainer.open_sinks(start or 0)
    n_params, trained = count_params(trainer.state["params"]), param_count(cfg).trained
    held = (
        f" ({trained:,} trained: slots past the deepest trained iteration stay at init)" if trained < n_params else ""
    )
    if freezes(cfg.train):  # gate-only fine-tuning: say what the optimiser updates
        params = trainer.state["params"]
        on = jax.tree.leaves(trained_mask(cfg.train, params))
        updated = sum(int(p.size) for p, o in zip(jax.tree.leaves(params), on, strict=True) if o)
        held = f" ({updated:,} updated: train.trainable={cfg.train.trainable}, the rest frozen)"
    trainer.say(
        f"{cfg.name}: {n_params:,} params{held}, steps {start or 0}->{cfg.train.steps}, workdir {trainer.workdir}"
    )
    trainer.writer.progress(start or 0)
    if (start or 0) >= cfg.train.steps:  # already finished: report the checkpoint's eval
        trainer.say(f"already trained to step {start} (train.steps={cfg.train.steps})")
        trainer.evaluate(None)
        status, step_done = "done", start
    else:
        status, step_done = trainer.train(start or 0)
    trainer.store.wait()
    jax.block_until_ready(trainer.state)
    return status, start, step_done
