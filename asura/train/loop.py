"""The training loop: `run(cfg, workdir) -> summary dict`, callable in-process.

Workdir layout::

    workdir/
      config.yaml        resolved config of this run (checked against on resume)
      metrics.jsonl      one JSON record per log/eval step (``step``, ``time``, ``train/*``, ``eval/*``)
      checkpoints/<step>/{state,data,meta}   orbax steps: last train.keep_checkpoints + best eval loss
      checkpoints_bad/   steps that failed to restore, moved aside on resume
      tb/                TensorBoard event files (train.tensorboard)

Resume is automatic: the newest checkpoint that restores is used (a corrupt one is moved
to checkpoints_bad/ with a warning); metrics.jsonl records past it are dropped so a resumed
run's log equals a straight run's. The config may differ from config.yaml only in
`checkpoint.HARMLESS_KEYS` (else ConfigMismatchError).

Exits: status "done"; "preempted" after SIGTERM/SIGINT (a checkpoint is saved first);
"stopped" when `stop_after` is hit (test hook). `train.max_nan_steps` consecutive
non-finite steps raise NonFiniteError without saving (the last checkpoint stays good).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asura.config import Config, config_from_yaml, config_to_yaml
from asura.train import throughput
from asura.train.checkpoint import CheckpointStore, check_resume_config, config_meta
from asura.train.evaluate import eval_depths, evaluate
from asura.train.metrics import MetricsWriter, flatten, to_python, truncate_jsonl
from asura.train.state import abstract_state, count_params, init_state
from asura.train.step import make_eval_step, make_train_step

# Tests and quick experiments: ~3x faster XLA:CPU compiles, slower steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
NAN_ENV = "ASURA_INJECT_NAN_STEPS"  # comma-separated 0-based steps whose loss is poisoned (fault tests)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite training steps."""


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves and returns at the next step boundary."""

    def __init__(self, install: bool):
        self.received: int | None = None
        self.old: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def data_api():
    """The data module exposing build_train_iterator & co (the package, or its pipeline module)."""
    import asura.data as data

    if hasattr(data, "build_train_iterator"):
        return data
    from asura.data import pipeline

    return pipeline


class _SyntheticIterator:
    """data.source=synthetic: batches are a pure function of the step; state is the step."""

    def __init__(self, cfg: Config, make: Callable):
        self.cfg, self.make, self.step = cfg, make, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.make(self.cfg, self.step)
        self.step += 1
        return batch

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def _train_iterator(cfg: Config):
    data = data_api()
    if cfg.data.source == "synthetic":
        return _SyntheticIterator(cfg, data.synthetic_batch)
    return data.build_train_iterator(cfg, process_index=jax.process_index(), process_count=jax.process_count())


def _eval_batches(cfg: Config, data) -> list[dict]:
    if cfg.data.source == "synthetic":  # held-out steps of the synthetic stream
        return [jax.device_get(data.synthetic_batch(cfg, 2**30 + i)) for i in range(cfg.train.eval_batches)]
    return data.build_eval_batches(
        cfg, cfg.train.eval_batches, process_index=jax.process_index(), process_count=jax.process_count()
    )


def _nan_steps_from_env() -> set[int]:
    raw = os.environ.get(NAN_ENV, "")
    return {int(s) for s in raw.split(",") if s.strip()}


def _prepare_workdir(cfg: Config, workdir: Path, store: CheckpointStore, say: Callable) -> None:
    """Check a resumed config against config.yaml, then (re)write config.yaml."""
    saved = workdir / "config.yaml"
    if store.steps() and saved.exists():
        changed = check_resume_config(config_from_yaml(saved.read_text()), cfg)
        if changed:
            say(f"resuming with changed harmless keys: {', '.join(changed)}")
    if jax.process_index() == 0:
        saved.write_text(config_to_yaml(cfg))


def _mean_metrics(pending: list[dict]) -> dict[str, Any]:
    host = jax.device_get(pending)
    keys = host[-1].keys()
    return {k: np.mean(np.stack([np.asarray(m[k], np.float64) for m in host]), axis=0) for k in keys}


def run(
    cfg: Config,
    workdir: str | Path,
    *,
    stop_after: int | None = None,
    nan_steps: Container[int] = (),
    install_signal_handlers: bool = True,
    say: Callable[[str], None] | None = None,
    compiler_options: dict | None = None,
) -> dict[str, Any]:
    """Train (or resume) `cfg` in `workdir`. Returns a summary dict (see end of function).

    stop_after: return right after this many total steps, with no extra save (simulates a kill).
    nan_steps:  0-based steps whose loss is multiplied by NaN (also via $ASURA_INJECT_NAN_STEPS).
    compiler_options: XLA options for the jitted steps, e.g. FAST_COMPILE for tests.
    say: where one-line messages go (default: stderr above the progress bar).
    """
    t_start = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    t = cfg.train
    data = data_api()
    data.check_compatible(cfg, process_count=jax.process_count())  # fail before any compilation
    from asura.model import sample_depth

    nan_steps = set(nan_steps) | _nan_steps_from_env()
    store = CheckpointStore(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    writer = MetricsWriter(workdir, cfg, enabled=is_main, total_steps=t.steps)
    say = say or writer.message
    # Multi-process: only orbax's coordinated preemption sync may trigger a save (a local
    # flag on one host would deadlock the others), so the handlers are single-process only.
    signals = _Signals(install_signal_handlers and jax.process_count() == 1)
    try:
        _prepare_workdir(cfg, workdir, store, say)
        from asura.parallel.placement import make_placement

        placement = make_placement(cfg, compiler_options)  # a mesh whenever there are several devices
        graphdef, rest, abstract = abstract_state(cfg)
        abstract = placement.abstract(abstract)  # restore straight onto this run's shardings
        train_iter = _train_iterator(cfg)
        restored = store.restore_latest_valid(abstract, warn=say) if store.steps() else None
        if restored is not None:
            start, state, data_state, _meta = restored
            train_iter.set_state(data_state)
            if is_main:
                truncate_jsonl(workdir / "metrics.jsonl", start)
            say(f"resumed from {store.directory}/{start}")
        else:
            start = 0
            graphdef, rest, state = init_state(cfg)
        state = placement.state(state)
        n_params = count_params(state["params"])

        train_step = placement.jit_step(make_train_step(cfg, graphdef, rest))
        eval_fn = placement.jit_eval(make_eval_step(cfg, graphdef, rest))
        eval_host = _eval_batches(cfg, data)
        eval_dev = [placement.batch(b) for b in eval_host]
        depths = eval_depths(cfg)
        flops_tok = throughput.train_flops_per_token(cfg)
        tokens_per_step = t.batch_size * cfg.data.seq_len
        say(f"{cfg.name}: {n_params:,} params, steps {start}->{t.steps}, workdir {workdir}")
        writer.progress(start)

        last_eval: dict[str, float] = {}
        last_train: dict[str, Any] = {}
        pending: list[dict] = []
        window_t0, window_steps = None, 0
        status, step_done = "done", start
        last_saved = start if restored is not None else None
        one, nan = jnp.float32(1.0), jnp.float32(np.nan)
        if t.timing_skip_steps == 0:  # time everything, compile included
            window_t0 = time.perf_counter()
        if start >= t.steps:  # nothing left to train: report the checkpoint's eval
            say(f"already trained to step {start} (train.steps={t.steps})")
            last_eval = evaluate(
                cfg, eval_fn, state["params"], eval_host, eval_dev, data.exact_match, depths, placement.to_local
            )

        def save(step: int, eval_loss: float | None = None) -> None:
            nonlocal last_saved
            store.save(step, state, train_iter.get_state(), config_meta(cfg, step, last_eval), eval_loss=eval_loss)
            last_saved = step

        for step in range(start, t.steps):
            batch = placement.batch(next(train_iter))
            n = jnp.asarray(sample_depth(cfg, step), jnp.int32)
            state, m = train_step(state, batch, n, nan if step in nan_steps else one)
            pending.append(m)
            step_done = step + 1
            if step_done - start == t.timing_skip_steps:
                jax.block_until_ready(m)
                window_t0, window_steps = time.perf_counter(), 0
            elif window_t0 is not None:
                window_steps += 1

            is_last = step_done == t.steps
            do_log = step_done % t.log_every == 0 or is_last
            do_ckpt = step_done % t.checkpoint_every == 0 or is_last
            if do_log or do_ckpt or step_done % t.eval_every == 0:
                # Host syncs happen only here. Skipped steps leave the state unchanged, so
                # catching a streak at the next sync point (not at its last step) is safe.
                _check_streak(pending, step_done - len(pending) + 1, t, last_saved)
            if do_log:
                avg = _mean_metrics(pending)
                pending = []
                record = flatten("train", avg)
                if window_t0 is not None and window_steps > 0:
                    dt = time.perf_counter() - window_t0
                    record.update(throughput.rates(cfg, tokens_per_step * window_steps / dt, flops_tok, placement))
                    window_t0, window_steps = time.perf_counter(), 0
                last_train = record
                writer.write(step_done, record)
                writer.progress(step_done, _bar_fields(record, last_eval))
            if step_done % t.eval_every == 0 or is_last:
                last_eval = evaluate(
                    cfg, eval_fn, state["params"], eval_host, eval_dev, data.exact_match, depths, placement.to_local
                )
                writer.write(step_done, last_eval)
                say(_eval_line(step_done, last_eval, depths))
                if last_train:  # refresh the bar's exact match, which would otherwise lag one eval
                    writer.progress(step_done, _bar_fields(last_train, last_eval))
            if do_ckpt and int(jax.device_get(m["nan_streak"])):
                say(f"step {step_done}: not checkpointing during a non-finite streak")
            elif do_ckpt:
                fresh_eval = last_eval.get("eval/loss") if step_done % t.eval_every == 0 or is_last else None
                save(step_done, fresh_eval)
            if stop_after is not None and step_done >= stop_after:
                status = "stopped"
                break
            if signals.received is not None or store.reached_preemption(step_done):
                if last_saved != step_done:
                    save(step_done)
                say(f"signal {signals.received}: saved step {step_done}, exiting")
                status = "preempted"
                break
        store.wait()
        jax.block_until_ready(state)
    finally:
        signals.restore()
        store.close()
        writer.close()
    return {
        "status": status,
        "step": step_done,
        "resumed_from": start if restored is not None else None,
        "n_params": n_params,
        "train": {k: to_python(v) for k, v in last_train.items()},
        "eval": last_eval,
        "final_loss": last_train.get("train/loss"),
        "exact_match": last_eval.get("eval/exact_match"),
        "nan_total": int(jax.device_get(state["nan_total"])),
        "wall_s": time.time() - t_start,
        "params": state["params"],
    }


def _bar_fields(train: dict, ev: dict) -> dict[str, float]:
    nan = float("nan")
    return {
        "loss": train["train/loss"],
        "acc": train.get("train/accuracy", nan),
        "lr": train["train/lr"],
        "em": ev.get("eval/exact_match", nan),
    }


def _check_streak(pending: list[dict], first_step: int, t, last_saved: int | None) -> None:
    """Raise NonFiniteError if any step since the last sync ended a streak of max_nan_steps."""
    streaks = [int(s) for s in jax.device_get([m["nan_streak"] for m in pending])]
    for i, streak in enumerate(streaks):
        if streak >= t.max_nan_steps:
            where = "none" if last_saved is None else f"step {last_saved}"
            raise NonFiniteError(
                f"{t.max_nan_steps} consecutive non-finite steps (loss or grad NaN/Inf) ending at step "
                f"{first_step + i}; stopped without saving; last good checkpoint: {where}"
            )


def _eval_line(step: int, ev: dict[str, float], depths: list[int]) -> str:
    nan = float("nan")
    per = " ".join(f"d{n}:{ev.get(f'eval/d{n}/loss', nan):.3f}/{ev[f'eval/d{n}/exact_match']:.2f}" for n in depths)
    return f"eval step {step}: loss {ev.get('eval/loss', float('nan')):.4f} em {ev['eval/exact_match']:.3f} | {per}"
