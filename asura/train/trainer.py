"""The train loop's named sub-actions (see asura.train.loop for the order they run in).

`Trainer` owns one run's mutable state (train state, data iterator, pending metrics, the
throughput window, the last save) so that `loop.run` reads as a plain sequence of steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asura import data as data_lib
from asura.config import Config, config_from_yaml, config_to_yaml
from asura.depth import eval_depths, sample_depth
from asura.storage.records import truncate_records
from asura.train import throughput
from asura.train.checkpoint import (
    CheckpointMismatchError,
    CheckpointStore,
    SaveError,
    check_resume_config,
    config_meta,
    first_line,
)
from asura.train.evaluate import evaluate_depths, flat_metrics
from asura.train.init_from import load_params
from asura.train.metrics import (
    MetricsWriter,
    bar_fields,
    decode_pending,
    encode_pending,
    eval_line,
    flatten,
    window_means,
)
from asura.train.state import abstract_state, init_state
from asura.train.step import halting_at, make_eval_step, make_train_step
from asura.train.workdir import Signals, WorkdirError, write_config


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


class Trainer:
    """One training run in one workdir; each sub-action below is one named step of `run`.

    Nothing user-visible is opened before `restore` has accepted the workdir: the metrics log,
    TensorBoard and the progress bar start in `open_sinks`, so a refused resume leaves no trace."""

    def __init__(self, cfg: Config, workdir, *, say, compiler_options, hooks: Hooks, lock=None, init_source=None):
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.init_source = init_source  # asura.train.init_from.Source: a fresh run's parameters come from it
        self.lock = lock  # its `lost` is set if another trainer takes the workdir over (gs://)
        self.is_main = jax.process_index() == 0
        t = cfg.train
        self.store = CheckpointStore(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoint)
        self.writer: MetricsWriter | None = None
        self._say = say
        self.compiler_options = compiler_options
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, Any] = {}
        self.pending: list[dict] = []
        self.window: tuple[float, int] | None = None  # (t0, steps) of the throughput window
        self.compiled: set[bool] = set()  # the train steps (plain / under halting) called so far: each compiles once
        self.eval_compiled = False
        self.last_saved: int | None = None
        self.state: dict | None = None

    def say(self, text: str) -> None:
        """A one-line message: the caller's `say`, else above the progress bar (stderr before it exists)."""
        if self._say is not None:
            self._say(text)
        elif self.writer is not None:
            self.writer.message(text)
        elif self.is_main:
            print(text, file=sys.stderr, flush=True)

    def status(self, text: str | None) -> None:
        """What the run is doing between steps (e.g. compiling), shown in the progress bar."""
        if self.writer is not None:
            self.writer.status(text)

    def open_sinks(self, step: int) -> None:
        """metrics.jsonl, TensorBoard and the progress bar, once the workdir has been accepted."""
        try:
            self.writer = MetricsWriter(
                self.workdir, self.cfg, enabled=self.is_main, total_steps=self.cfg.train.steps, initial_step=step
            )
        except OSError as e:
            raise SaveError(f"cannot write the metrics log or TensorBoard in {self.workdir}: {first_line(e)}") from None

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
        # by `halting`: a run with depth.halt_from > 0 trains with its own loss, then under halting
        phases = {halting_at(cfg, 0), halting_at(cfg, cfg.train.steps - 1)}
        self.train_fns = {
            h: self.placement.jit_step(make_train_step(cfg, self.graphdef, self.rest, self.axes, halting=h))
            for h in phases
        }
        self.eval_fn = self.placement.jit_eval(make_eval_step(cfg, self.graphdef, self.rest))
        self.depths = eval_depths(cfg)
        self.flops_per_token = throughput.train_flops_per_token(cfg)

    def restore(self) -> int | None:
        """Resume from the newest valid checkpoint (returns its step) or initialise (None)."""
        changed: list[str] = []

        def check_meta(meta: dict, step: int) -> None:
            # The checkpoint's own config is the authority (config.yaml may be newer or torn);
            # checked before the tree, so a changed config is named as such.
            changed[:] = check_resume_config(config_from_yaml(meta["config_yaml"]), self.cfg, step)

        restored = self.store.restore_latest_valid(
            self.abstract, check_meta=check_meta, apply_data=self._apply_data, warn=self.say
        )
        if restored is None:
            self.state = init_state(self.cfg).state
            start = None
            if self.init_source is not None:
                self.state["params"] = load_params(self.init_source, self.placement)
                self.say(f"parameters from {self.init_source.path} (train.init_from); optimiser, schedule fresh")
        else:
            start, self.state = restored.step, restored.state
            # steps trained since the last log record: the next record averages them too, as in a straight run
            self.pending = decode_pending(restored.meta.get("pending", []))
            if changed:
                self.say(f"resuming with changed keys: {', '.join(changed)}")
            self.last_saved = start
            self.say(f"resumed from {self.store.directory}/{start}")
        if self.is_main:  # work a killed run logged past its last checkpoint is redone, not repeated
            try:
                truncate_records(self.workdir, start or 0)
                write_config(self.workdir, config_to_yaml(self.cfg))
            except OSError as e:
                raise SaveError(
                    f"cannot write config.yaml or metrics.jsonl in {self.workdir}: {first_line(e)}"
                ) from None
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
        halting = halting_at(self.cfg, step)
        first = halting not in self.compiled
        if first:  # the call compiles before it dispatches: say so instead of sitting at 0%
            self.status("compiling the train step" + (" under halting" if halting else ""))
        self.state, m = self.train_fns[halting](self.state, self.placement.batch(batch), n)
        if first:
            self.compiled.add(halting)
            self.status(None)
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
        record = flatten("train", window_means(self.pending))
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
        self.writer.progress(step_done, bar_fields(self.cfg, record, self.last_eval))

    def evaluate(self, step_done: int | None) -> dict[str, float]:
        """Depth sweep on the fixed eval batches; written to the log when step_done is given."""
        self.status("compiling the eval step" if not self.eval_compiled else "evaluating")
        by_depth = evaluate_depths(
            lambda batch, n: self.eval_fn(self.state["params"], batch, n),
            self.eval_host,
            self.depths,
            data_lib.exact_match,
            placed=self.eval_dev,
            to_local=self.placement.to_local,
        )
        self.eval_compiled = True
        self.status(None)
        self.last_eval = flat_metrics(self.cfg, by_depth)
        if step_done is not None:
            self.writer.write(step_done, self.last_eval)
            self.say(eval_line(self.cfg, step_done, self.last_eval, self.depths))
            if self.last_train:  # refresh the bar's eval field, which would otherwise lag one eval
                self.writer.progress(step_done, bar_fields(self.cfg, self.last_train, self.last_eval))
        return self.last_eval

    def check_lock(self, step_done: int) -> None:
        """Confirm process 0's workdir lock now (gs://: a compare-and-swap; an flock cannot be lost) and
        stop every process of the job alike when another trainer has taken the workdir over."""
        lost = self.lock.confirm() if self.lock is not None else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if not int(multihost_utils.broadcast_one_to_all(np.int32(lost is None))) and lost is None:
                lost = "process 0 lost the workdir lock to another trainer"
        if lost is not None:
            raise WorkdirError(f"{lost}; stopped at step {step_done} without saving")

    def checkpoint(self, step_done: int, fresh_eval: bool) -> None:
        if int(jax.device_get(self.state["nan_streak"])):
            self.say(f"step {step_done}: not checkpointing during a non-finite streak")
            return
        best = self.last_eval.get("eval/ce") if fresh_eval else None
        self.writer.flush()  # the records up to this step are durable when the step is (gs:// buffers them)
        meta = config_meta(self.cfg, step_done, self.last_eval)
        meta["pending"] = encode_pending(self.pending)  # not yet logged: a resume must average them in
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
            compiles = halting_at(self.cfg, step) not in self.compiled
            m = self.train_step(step)
            step_done = step + 1
            # the window restarts after the warm-up steps, and after the halting step's compile (depth.halt_from)
            recompiled = compiles and step > start and self.window is not None
            if recompiled or step_done - start == t.timing_skip_steps:
                jax.block_until_ready(m)
                self.window = (time.perf_counter(), 0)
            elif self.window is not None:
                self.window = (self.window[0], self.window[1] + 1)
            is_last = step_done == t.steps
            # the last step of the run's own loss is logged, so no record averages it with halting's
            switch = halting_at(self.cfg, step_done) != halting_at(self.cfg, step)
            do_log = step_done % t.log_every == 0 or is_last or switch
            do_eval = step_done % t.eval_every == 0 or is_last
            do_ckpt = step_done % t.checkpoint_every == 0 or is_last
            if do_log or do_eval or do_ckpt:
                self.check_lock(step_done)  # nothing is written over another trainer's workdir
                # Skipped steps leave the state unchanged, so catching a streak here is safe.
                self.check_finite(step_done)
            if do_log:
                self.log(step_done)
            if do_eval:
                self.evaluate(step_done)
            if do_ckpt:
                self.checkpoint(step_done, fresh_eval=do_eval)
            else:
                self.store.poll()  # the last async save's file checksums, as soon as it commits
            if self.hooks.after_step is not None and self.hooks.after_step(step_done):
                return "stopped", step_done
            if Signals.received is not None or self.store.reached_preemption(step_done):
                if self.last_saved != step_done:
                    self.check_lock(step_done)
                    self.checkpoint(step_done, fresh_eval=False)
                self.say(f"signal {Signals.received}: saved step {step_done}, exiting")
                return "preempted", step_done
        return status, step_done

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.writer is not None:
                self.writer.close()
