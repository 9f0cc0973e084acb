"""The training loop: `run(cfg, workdir) -> summary dict`, callable in-process.

Read it top-down like nanodo's train.py: `run` builds a `Trainer` and calls its named
sub-actions in order: build the state, restore, then per step `train_step`, `log`,
`evaluate`, `checkpoint`. Host syncs happen only at log / eval / checkpoint points, so
the device never waits on the host between them.

Workdir layout::

    workdir/
      config.yaml        resolved config of this run (written atomically; each checkpoint's own
                         saved config is the authority on resume)
      metrics.jsonl      one JSON record per log/eval step (``step``, ``time``, ``train/*``, ``eval/*``)
      checkpoints/<step>/{state,data,meta}   orbax steps: last train.keep_checkpoints + best eval ce
      checkpoints_bad/   steps that failed to restore, moved aside on resume
      tb/                TensorBoard event files (train.tensorboard)

Resume is automatic from the newest checkpoint that restores; metrics.jsonl records past it
are dropped so a resumed run's log equals a straight run's. The config may differ from the
checkpoint's only in `checkpoint.HARMLESS_KEYS` (else ConfigMismatchError).

Statuses: "done"; "preempted" after SIGTERM/SIGINT (a checkpoint is saved first); "stopped"
when an injected `Hooks.after_step` asks to stop. `train.max_nan_steps` consecutive
non-finite steps raise NonFiniteError without saving (the last checkpoint stays good).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asura import data as data_lib
from asura.config import Config, config_from_yaml, config_to_yaml
from asura.depth import eval_depths, sample_depth
from asura.train import throughput
from asura.train.checkpoint import CheckpointMismatchError, CheckpointStore, check_resume_config, config_meta
from asura.train.evaluate import evaluate_depths, flat_metrics
from asura.train.metrics import MetricsWriter, flatten, to_python, truncate_jsonl
from asura.train.preflight import preflight
from asura.train.state import abstract_state, count_params, init_state
from asura.train.step import make_eval_step, make_train_step
from asura.train.workdir import Signals, WorkdirError, WorkdirLock, write_config

# Tests and quick experiments: ~3x faster XLA:CPU compiles, slower steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite training steps."""


@dataclass
class Hooks:
    """Injected callables for tests, notebooks and fault drills; production runs pass none.

    before_step(step, batch) -> batch   sees each host batch before it is placed (fault injection)
    after_step(step) -> bool            True stops the run right after `step` steps, with no
                                        extra save: the state a kill at that moment leaves
    """

    before_step: Callable[[int, dict], dict] | None = None
    after_step: Callable[[int], bool] | None = None


def _mean_metrics(pending: list[dict]) -> dict[str, Any]:
    """Window means; per-iteration entries that never ran (NaN) are averaged over the steps that ran them."""
    host = jax.device_get(pending)
    out = {}
    for k in host[-1]:
        x = np.stack([np.asarray(m[k], np.float64) for m in host])
        if k == "ce_per_iter":
            ran = np.isfinite(x)
            out[k] = np.where(ran.any(0), np.where(ran, x, 0).sum(0) / np.maximum(ran.sum(0), 1), np.nan)
        else:
            out[k] = x.mean(0)
    return out


class Trainer:
    """One training run in one workdir; each sub-action below is one named step of `run`."""

    def __init__(self, cfg: Config, workdir: Path, *, say, compiler_options, hooks: Hooks):
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.is_main = jax.process_index() == 0
        t = cfg.train
        self.store = CheckpointStore(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoint)
        self.writer = MetricsWriter(workdir, cfg, enabled=self.is_main, total_steps=t.steps)
        self.say = say or self.writer.message
        self.compiler_options = compiler_options
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, Any] = {}
        self.pending: list[dict] = []
        self.window: tuple[float, int] | None = None  # (t0, steps) of the throughput window
        self.last_saved: int | None = None
        self.state: dict | None = None

    # ------------------------------------------------------------ build / restore
    def build_state(self) -> None:
        """Model, optimiser state, placement, compiled steps, data iterators, eval batches."""
        from asura.parallel.placement import make_placement

        cfg = self.cfg
        built = abstract_state(cfg)
        self.graphdef, self.rest, self.axes = built.graphdef, built.rest, built.axes
        self.placement = make_placement(cfg, built.axes, self.compiler_options)
        self.abstract = self.placement.abstract(built.state)  # restore straight onto this run's shardings
        pid, pcount = jax.process_index(), jax.process_count()
        self.train_iter = data_lib.build_train_iterator(cfg, process_index=pid, process_count=pcount)
        self.eval_host = data_lib.build_eval_batches(
            cfg, cfg.train.eval_batches, process_index=pid, process_count=pcount
        )
        self.eval_dev = [self.placement.batch(b) for b in self.eval_host]
        self.train_fn = self.placement.jit_step(make_train_step(cfg, self.graphdef, self.rest, self.axes))
        self.eval_fn = self.placement.jit_eval(make_eval_step(cfg, self.graphdef, self.rest))
        self.depths = eval_depths(cfg)
        self.flops_per_token = throughput.train_flops_per_token(cfg)

    def restore(self) -> int | None:
        """Resume from the newest valid checkpoint (returns its step) or initialise (None)."""
        changed: list[str] = []

        def check_meta(meta: dict) -> None:
            # The checkpoint's own config is the authority (config.yaml may be newer or torn);
            # checked before the tree, so a changed config is named as such.
            changed[:] = check_resume_config(config_from_yaml(meta["config_yaml"]), self.cfg)

        restored = self.store.restore_latest_valid(
            self.abstract, check_meta=check_meta, apply_data=self._apply_data, warn=self.say
        )
        if restored is None:
            self.state = init_state(self.cfg).state
            start = None
        else:
            start, self.state = restored.step, restored.state
            if changed:
                self.say(f"resuming with changed harmless keys: {', '.join(changed)}")
            self.last_saved = start
            self.say(f"resumed from {self.store.directory}/{start}")
        if self.is_main:  # work a killed run logged past its last checkpoint is redone, not repeated
            truncate_jsonl(self.workdir / "metrics.jsonl", start or 0)
            write_config(self.workdir, config_to_yaml(self.cfg))
        self.state = self.placement.state(self.state)
        return start

    def _apply_data(self, data_state) -> None:
        try:
            self.train_iter.set_state(data_state)
        except (KeyError, ValueError, TypeError, IndexError) as e:  # grain raises these for a foreign state
            raise CheckpointMismatchError(
                f"the data-iterator state in the checkpoint does not fit this data pipeline "
                f"({type(e).__name__}: {str(e)[:120]}); nothing was moved (use the config that wrote it)"
            ) from None

    # ---------------------------------------------------------------- per step
    def train_step(self, step: int) -> dict:
        batch = next(self.train_iter)
        if self.hooks.before_step is not None:
            batch = self.hooks.before_step(step, batch)
        n = jnp.asarray(sample_depth(self.cfg, step), jnp.int32)
        self.state, m = self.train_fn(self.state, self.placement.batch(batch), n)
        self.pending.append(m)
        return m

    def check_finite(self, step_done: int) -> None:
        """Raise NonFiniteError if any step since the last sync ended a streak of max_nan_steps."""
        t = self.cfg.train
        first = step_done - len(self.pending) + 1
        streaks = [int(s) for s in jax.device_get([m["nan_streak"] for m in self.pending])]
        for i, streak in enumerate(streaks):
            if streak >= t.max_nan_steps:
                where = "none" if self.last_saved is None else f"step {self.last_saved}"
                raise NonFiniteError(
                    f"{t.max_nan_steps} consecutive non-finite steps (loss or grad NaN/Inf) ending at step "
                    f"{first + i}; stopped without saving; last good checkpoint: {where}"
                )

    def log(self, step_done: int) -> None:
        record = flatten("train", _mean_metrics(self.pending))
        # An iteration that never ran in this window has no CE: leave it out rather than log 0 or NaN.
        record = {k: v for k, v in record.items() if not (k.startswith("train/ce_per_iter/") and np.isnan(v))}
        self.pending = []
        if self.window is not None and self.window[1] > 0:
            t0, steps = self.window
            tokens = self.cfg.train.batch_size * self.cfg.data.seq_len * steps
            rates = throughput.rates(
                self.cfg, tokens / (time.perf_counter() - t0), self.flops_per_token, self.placement
            )
            record.update(rates)
            self.window = (time.perf_counter(), 0)
        self.last_train = record
        self.writer.write(step_done, record)
        self.writer.progress(step_done, _bar_fields(record, self.last_eval))

    def evaluate(self, step_done: int | None) -> dict[str, float]:
        """Depth sweep on the fixed eval batches; written to the log when step_done is given."""
        by_depth = evaluate_depths(
            lambda batch, n: self.eval_fn(self.state["params"], batch, n),
            self.eval_host,
            self.depths,
            data_lib.exact_match,
            placed=self.eval_dev,
            to_local=self.placement.to_local,
        )
        self.last_eval = flat_metrics(self.cfg, by_depth)
        if step_done is not None:
            self.writer.write(step_done, self.last_eval)
            self.say(_eval_line(step_done, self.last_eval, self.depths))
            if self.last_train:  # refresh the bar's exact match, which would otherwise lag one eval
                self.writer.progress(step_done, _bar_fields(self.last_train, self.last_eval))
        return self.last_eval

    def checkpoint(self, step_done: int, fresh_eval: bool) -> None:
        if int(jax.device_get(self.state["nan_streak"])):
            self.say(f"step {step_done}: not checkpointing during a non-finite streak")
            return
        best = self.last_eval.get("eval/ce") if fresh_eval else None
        meta = config_meta(self.cfg, step_done, self.last_eval)
        self.store.save(step_done, self.state, self.train_iter.get_state(), meta, eval_ce=best)
        self.last_saved = step_done

    # -------------------------------------------------------------------- loop
    def train(self, start: int) -> tuple[str, int]:
        """Steps start..train.steps; returns (status, steps done)."""
        t = self.cfg.train
        status, step_done = "done", start
        if t.timing_skip_steps == 0:  # time everything, compile included
            self.window = (time.perf_counter(), 0)
        for step in range(start, t.steps):
            m = self.train_step(step)
            step_done = step + 1
            if step_done - start == t.timing_skip_steps:
                jax.block_until_ready(m)
                self.window = (time.perf_counter(), 0)
            elif self.window is not None:
                self.window = (self.window[0], self.window[1] + 1)
            is_last = step_done == t.steps
            do_log = step_done % t.log_every == 0 or is_last
            do_eval = step_done % t.eval_every == 0 or is_last
            do_ckpt = step_done % t.checkpoint_every == 0 or is_last
            if do_log or do_eval or do_ckpt:
                # Skipped steps leave the state unchanged, so catching a streak here is safe.
                self.check_finite(step_done)
            if do_log:
                self.log(step_done)
            if do_eval:
                self.evaluate(step_done)
            if do_ckpt:
                self.checkpoint(step_done, fresh_eval=do_eval)
            if self.hooks.after_step is not None and self.hooks.after_step(step_done):
                return "stopped", step_done
            if Signals.received is not None or self.store.reached_preemption(step_done):
                if self.last_saved != step_done:
                    self.checkpoint(step_done, fresh_eval=False)
                self.say(f"signal {Signals.received}: saved step {step_done}, exiting")
                return "preempted", step_done
        return status, step_done

    def close(self) -> None:
        self.store.close()
        self.writer.close()


def run(
    cfg: Config,
    workdir: str | Path,
    *,
    hooks: Hooks | None = None,
    install_signal_handlers: bool = True,
    say: Callable[[str], None] | None = None,
    compiler_options: dict | None = None,
) -> dict[str, Any]:
    """Train (or resume) `cfg` in `workdir`. Returns a summary dict (see the end of this function).

    compiler_options: XLA options for the jitted steps, e.g. FAST_COMPILE for tests.
    say: where one-line messages go (default: stderr above the progress bar).
    """
    t_start = time.time()
    # Multi-process: only orbax's coordinated preemption sync may trigger a save (a local
    # flag on one host would deadlock the others), so the handlers are single-process only.
    installed = install_signal_handlers and jax.process_count() == 1 and Signals.install()
    workdir = Path(workdir)
    try:
        data_lib.check_compatible(cfg, process_count=jax.process_count())  # before any compilation
        preflight(cfg, workdir)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
        with WorkdirLock(workdir):
            if Signals.received is not None:  # signalled during imports: nothing started, nothing to save
                say = say or (lambda m: print(m, file=sys.stderr))
                say(f"signal {Signals.received} before the first step: exiting")
                return {"status": "preempted", "step": 0, "resumed_from": None, "eval": {}, "train": {},
                        "wall_s": time.time() - t_start, "params": None, "nan_total": 0}  # fmt: skip
            trainer = Trainer(cfg, workdir, say=say, compiler_options=compiler_options, hooks=hooks or Hooks())
            try:
                status, start, step_done = _run(trainer)
            finally:
                trainer.close()
    finally:
        if installed:
            Signals.restore()
    state = trainer.state
    return {
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
    n_params = count_params(trainer.state["params"])
    trainer.say(f"{cfg.name}: {n_params:,} params, steps {start or 0}->{cfg.train.steps}, workdir {trainer.workdir}")
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


def _bar_fields(train: dict, ev: dict) -> dict[str, float]:
    nan = float("nan")
    return {
        "ce": train.get("train/ce", nan),
        "acc": train.get("train/accuracy", nan),
        "lr": train.get("train/lr", nan),
        "em": ev.get("eval/exact_match", nan),
    }


def _eval_line(step: int, ev: dict[str, float], depths: list[int]) -> str:
    nan = float("nan")
    per = " ".join(
        f"d{n}:{ev.get(f'eval/d{n}/ce', nan):.3f}/{ev.get(f'eval/d{n}/exact_match', nan):.2f}" for n in depths
    )
    return f"eval step {step}: ce {ev.get('eval/ce', nan):.4f} em {ev.get('eval/exact_match', nan):.3f} | ce/em {per}"
