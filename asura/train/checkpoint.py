"""Orbax checkpoints: async saves, keep-last-N plus best-by-eval-ce, resume from the latest VALID step.

Each step directory holds three items:
    state  StandardSave of the train-state pytree (params, opt_state, step, counters)
    data   JsonSave of the data iterator's state (so a resume never replays data)
    meta   JsonSave of {step, config (resolved YAML), eval metrics}

A corrupt step (checksum, seal or read failure, see asura.train.integrity) is skipped with a
warning and the previous step is tried; once an older step restores, the corrupt newer ones are
moved to ``checkpoints_bad/``. When no step restores nothing is moved and the resume is refused,
so a rerun meets the same refusal instead of training from step 0 over the run's history. A step
written by other code (tree, shape, dtype) stops the resume with one line and moves nothing.
Orbax writes into a temporary directory and renames on commit, so a save killed half-way never
shows up as a step; a save that fails (disk full) has its temporary directory removed.

Once a store is opened, orbax's own error logs and the leftovers of its failed writer tasks are
silenced (`OrbaxNoise`): a failed save surfaces as one SaveError line.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from asura.compat import orbax_preservation
from asura.config import Config, config_to_dict, config_to_yaml
from asura.storage.paths import is_remote, move_tree, to_path
from asura.train.integrity import (
    CHECKSUMS,
    CorruptStep,
    check_restored,
    check_seal,
    first_tree_difference,
    seal,
    verify,
    write_checksums,
)
from asura.train.optim import schedule_change

BEST_METRIC = "eval_ce"  # the final iteration's eval CE at the trained depth (asura.train.evaluate)

# Keys that may differ between the saved config and a resumed run's config. They change
# bookkeeping, not the maths of the run so far.
HARMLESS_KEYS = frozenset(
    {
        "name",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.eval_depths",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.async_checkpoint",
        "train.max_nan_steps",
        "train.timing_skip_steps",
        "train.progress",
        "train.tensorboard",
        "train.wandb",
        "train.wandb_project",
        "train.init_from",  # read only when the workdir has no checkpoint (asura.train.init_from)
        "data.eval_difficulty",
        "data.prefetch",
        "data.worker_count",
        "model.attention",
        "model.attn_block_q",
        "model.attn_block_k",
        "model.remat",
    }
)
HARMLESS_PREFIXES = ("mesh.",)  # resharding on restore is allowed
# Keys that shape the lr schedule's length: a change is allowed when no step already trained gets
# another lr (asura.train.optim.schedule_change); that is how a run is extended (train.py --extend).
SCHEDULE_KEYS = frozenset({"train.steps", "train.hold_at", "train.rewarm_at"})


class ConfigMismatchError(ValueError):
    """Resuming a workdir with a config that changes the run's maths."""


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "rules":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    a, b = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(old: Config, new: Config, trained: int) -> list[str]:
    """Raise ConfigMismatchError on a harmful difference; return the harmless changed keys.

    `trained`: the checkpoint's step. A schedule key (SCHEDULE_KEYS) may change only when every
    step before it keeps its lr; otherwise the message offers the two ways to extend a run."""
    diff = config_diff(old, new)
    allowed = HARMLESS_KEYS | SCHEDULE_KEYS
    bad = {k: v for k, v in diff.items() if k not in allowed and not k.startswith(HARMLESS_PREFIXES)}
    if bad:
        desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in bad.items())
        raise ConfigMismatchError(
            f"workdir was trained with a different config ({desc}); use a new --workdir or the saved config.yaml"
        )
    if SCHEDULE_KEYS & set(diff) and (change := schedule_change(old.train, new.train, trained)) is not None:
        desc = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items() if k in SCHEDULE_KEYS)
        o = old.train
        raise ConfigMismatchError(
            f"{desc} would change the lr of steps already trained ({change}); to go on from step {trained}, pass "
            f"--extend continue (keep the old schedule: its cosine ends at step {o.steps}, then the lr holds there) "
            f"or --extend rewarm (at step {o.steps} warm up again to {o.lr:g} over {o.warmup_steps} steps, then "
            "cosine to train.steps)"
        )
    return sorted(diff)


def encode_data_state(state: Any) -> Any:
    """Iterator states may be bytes (grain); JSON needs text."""
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return state


def decode_data_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: orbax errors can run to pages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# tensorstore reports a failed write as '... Failed to write 10488 bytes to file 22: File too large
# [os_error_code='27']' after two long paths; the OS's reason is what the user needs.
_OS_REASON = re.compile(r":\s*([^:\[\]]+?)\s*\[os_error_code='(\d+)'\]")


_OS_ERRORS = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
              "Permission denied", "Input/output error")  # fmt: skip


def save_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS error when there is one (disk full, file too large),
    looked for in the exception and the ones it was raised from."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        text = str(seen)
        if m := _OS_REASON.search(text):
            return m.group(1)
        if known := next((k for k in _OS_ERRORS if k in text), None):
            return known
        seen = seen.__cause__ or seen.__context__
    return first_line(e)


class CheckpointMismatchError(ValueError):
    """A checkpoint this code cannot use as it is (another tree, shape, dtype or data pipeline).
    Nothing is moved: the checkpoint is fine, the code or config changed. One line."""


class CheckpointError(RuntimeError):
    """Resume cannot go on: steps exist but none restores; one line."""


class SaveError(RuntimeError):
    """A save failed (disk full, unwritable dir); one line with the path and the OS error.
    The previous committed step is untouched."""


CORRUPT = (OSError, ValueError, RuntimeError, KeyError)  # what orbax/tensorstore raise for bad files (+ CorruptStep)


def corrupt_cause(e: BaseException | None) -> BaseException | None:
    """The CORRUPT error behind e, if any: orbax wraps a tensorstore read error (e.g. a flipped bit
    in a zstd block: 'Data corruption detected') in a bare Exception raised from it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CORRUPT):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class OrbaxNoise:
    """Once a store has been opened, for the rest of the process: drop orbax's ERROR logs (their
    tracebacks repeat the exception that reaches us, which we report in one line), asyncio's
    "... exception was never retrieved" for orbax's writer tasks and futures (the same exception
    again, logged when a failed save's leftover tasks are garbage-collected, possibly after the
    store is closed),
    and the "Event loop is closed" reports that tensorstore's callbacks raise once a failed save has
    closed orbax's event loop. Nothing else is filtered."""

    _lock = threading.Lock()
    _installed = False
    _previous_hook = None

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""))

    @staticmethod
    def _asyncio_filter(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text.split("\n", 1)[0] and "orbax" in text)

    @classmethod
    def _unraisable(cls, unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        (cls._previous_hook or sys.__unraisablehook__)(unraisable)

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            logging.getLogger("absl").addFilter(cls._filter)
            logging.getLogger("asyncio").addFilter(cls._asyncio_filter)
            cls._previous_hook, sys.unraisablehook = sys.unraisablehook, cls._unraisable
            cls._installed = True


class Attempt(NamedTuple):
    value: Any  # what the restore returned; None when it did not restore
    why: str | None  # None when it restored


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: Any
    meta: dict


class _ReadOnlyNotices(logging.Filter):
    """orbax's notices that a store opened read-only is read-only ("Given directory is read only",
    "read_only=True, setting save_interval_steps=0"): they describe what we asked for, and in a
    notebook, a sweep's extrapolation or a fine-tune's source they repeat for every checkpoint.
    Exactly those two are dropped on the absl logger; every other absl warning still shows."""

    PREFIXES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_READ_ONLY_NOTICES = _ReadOnlyNotices()


class CheckpointStore:
    def __init__(self, directory, *, keep: int, async_save: bool, read_only: bool = False):
        """read_only: for analysis; creates, cleans and deletes nothing. directory: local or gs://."""
        if read_only:  # orbax logs through absl.logging, whose records come from this logger
            absl = logging.getLogger("absl")
            if _READ_ONLY_NOTICES not in absl.filters:
                absl.addFilter(_READ_ONLY_NOTICES)
        directory = to_path(directory)
        self.remote = is_remote(directory)
        self.directory = directory if self.remote else to_path(Path(os.fspath(directory)).resolve())
        policy = orbax_preservation(keep, BEST_METRIC)
        kwargs: dict[str, Any] = {"preservation_policy": policy} if policy is not None else {"max_to_keep": keep}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            **kwargs,
        )
        handlers = {  # explicit, so item metadata (the saved tree) is readable before any restore
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.read_only = read_only
        OrbaxNoise.install()
        self._open = True
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._unsummed: int | None = None  # the last saved step, until its checksums are written
        self._skipped: set[int] = set()  # unusable steps that could not be moved aside

    # ------------------------------------------------------------------- save
    def save(self, step: int, state, data_state, meta: dict, *, eval_ce: float | None = None) -> None:
        """Start an (async) save of one step; a failed save raises SaveError with one line."""
        self.wait()  # the previous save must be committed (and checksummed) before the next starts
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        free = need if self.remote else shutil.disk_usage(os.fspath(self.directory)).free  # buckets do not fill
        if free < need:
            kept = self.steps()
            last = f"step {kept[-1]} is kept" if kept else "no earlier checkpoint exists"
            raise SaveError(
                f"checkpoint {self.directory}/{step}: {free:,} bytes free, the state needs {need:,} (disk full); {last}"
            )
        metrics = {BEST_METRIC: float(eval_ce)} if eval_ce is not None else None
        data_json = encode_data_state(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_json),
            meta=ocp.args.JsonSave(seal(meta, state, data_json)),  # committed with the step it describes
        )
        try:
            self.mngr.save(step, args=args, metrics=metrics, force=True)
        except CORRUPT as e:
            self._discard_partial(step)
            raise SaveError(self._failed(step, e)) from None
        self._unsummed = step

    def poll(self) -> None:
        """Write the last save's file checksums as soon as it has committed (cheap when it has not):
        the window in which a kill leaves a step without them is one step, not a checkpoint interval."""
        if self._unsummed is not None and not self.mngr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the last save is committed, then write its checksums; raises SaveError."""
        try:
            self.mngr.wait_until_finished()
        except CORRUPT as e:
            step = self._unsummed
            self._unsummed = None
            if step is not None:
                self._discard_partial(step)
            raise SaveError(self._failed(step, e)) from None
        step, self._unsummed = self._unsummed, None
        if step is not None and jax.process_index() == 0 and not self.remote and (self.directory / str(step)).is_dir():
            try:
                write_checksums(self.directory / str(step))
            except OSError as e:  # the step itself is committed and sealed; only its file checksums are missing
                raise SaveError(f"writing the checksums of {self.directory}/{step} failed: {first_line(e)}") from None

    def _failed(self, step: int | None, e: BaseException) -> str:
        kept = [s for s in self.steps() if s != step]
        last = f"step {kept[-1]} is kept" if kept else "no earlier checkpoint exists"
        return f"saving checkpoint {self.directory}/{step} failed: {save_failure(e)}; {last}"

    def _discard_partial(self, step: int) -> None:
        """Remove what a failed save left (orbax's temporary directory for the step)."""
        if jax.process_index() != 0:
            return
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            with contextlib.suppress(OSError):
                tmp.rmtree()

    def close(self) -> None:
        if not self._open:
            return
        try:
            self.wait()
        finally:
            self.mngr.close()
            self._open = False

    # ---------------------------------------------------------------- restore
    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(s for s in self.mngr.all_steps() if s not in self._skipped)

    def best_step(self) -> int | None:
        """The kept step with the lowest eval ce (None when no kept step was evaluated)."""
        return self.mngr.best_step()

    def restore(self, step: int, abstract_state) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of one step, checked against the seal saved with it; orbax's own
        errors, or CorruptStep, for a bad step."""
        out = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state, meta = jax.block_until_ready(out["state"]), dict(out["meta"])
        check_seal(meta)
        check_restored(meta, state, out["data"])
        return state, decode_data_state(out["data"]), meta

    def check_tree(self, step: int, abstract_state) -> None:
        """CheckpointMismatchError naming the first leaf whose tree position, shape or dtype differs."""
        saved = self.mngr.item_metadata(step)["state"]
        if saved is None:
            raise ValueError("no readable state metadata")  # corrupt: the caller falls back
        diff = first_tree_difference(getattr(saved, "tree", saved), abstract_state)
        if diff is not None:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this code: {diff}; nothing was moved "
                "(use the code that wrote it, or a new --workdir)"
            )

    def read_meta(self, step: int) -> dict:
        meta = dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        check_seal(meta)
        return meta

    def attempt(self, step: int, restore) -> Attempt:
        """`restore(step)` once the step's checksums verify. An unreadable step (checksum, orbax or
        tensorstore error) gives its reason in one line; a mismatch with this code or config raises."""
        why = verify(self.directory / str(step))
        if why is not None:
            return Attempt(None, why)
        try:
            return Attempt(restore(step), None)
        except (CheckpointMismatchError, ConfigMismatchError):
            raise
        except CorruptStep as e:
            return Attempt(None, str(e))
        except CORRUPT as e:
            return Attempt(None, f"{type(e).__name__}: {first_line(e)}")
        except Exception as e:  # orbax's bare wrapper of a read error; anything else is a bug: raise it
            cause = corrupt_cause(e)
            if cause is None:
                raise
            return Attempt(None, f"{type(cause).__name__}: {first_line(cause)}")

    def restore_latest_valid(self, abstract_state, *, check_meta=None, apply_data=None, warn=None) -> Restored | None:
        """The newest step that is intact and restores; None when there are no steps at all.

        Corrupt steps (checksum, seal, unreadable) are skipped and the previous is tried; once one
        restores, the skipped ones are moved to checkpoints_bad/. A step from other code raises
        CheckpointMismatchError (nothing moved); when steps exist but none restores, CheckpointError
        refuses to retrain from 0 over them and moves nothing, so a rerun is refused the same way.
        `check_meta(meta, step)` runs first on an intact step (it raises ConfigMismatchError for a
        config that changes the run's maths); `apply_data(data_state)` runs inside the fallback (it
        raises CheckpointMismatchError when the data pipeline cannot take the state).
        """
        warn = warn or (lambda m: warnings.warn(m, stacklevel=2))
        steps = self.steps()

        def restore(step):
            if check_meta is not None:
                check_meta(self.read_meta(step), step)
            self.check_tree(step, abstract_state)
            return self.restore(step, abstract_state)

        bad: list[tuple[int, str]] = []
        for step in reversed(steps):
            attempt = self.attempt(step, restore)
            if attempt.why is None:
                state, data_state, meta = attempt.value
                if apply_data is not None:
                    apply_data(data_state)
                for b, _ in bad:
                    self._quarantine(b, warn)
                self._fill_checksums(step)
                return Restored(step, state, data_state, meta)
            warn(f"checkpoint step {step} is unreadable ({attempt.why}); trying the one before")
            bad.append((step, attempt.why))
        if steps:
            why = "; ".join(f"step {s}: {w}" for s, w in bad[:3])
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores ({len(steps)} tried; {why}); refusing to retrain "
                "from step 0 over them: nothing was moved; move the workdir aside to start afresh"
            )
        return None

    def _fill_checksums(self, step: int) -> None:
        """A step restored and verified against its seal but without file checksums (a kill came
        between its commit and their write): write them now, so later checks have them."""
        step_dir = self.directory / str(step)
        if self.read_only or self.remote or jax.process_index() != 0 or (step_dir / CHECKSUMS).exists():
            return
        with contextlib.suppress(OSError):  # still verified by its seal on every restore
            write_checksums(step_dir)

    def _quarantine(self, step: int, warn) -> None:
        """Move a corrupt step aside so orbax never lists it again (a later save may reuse the number)."""
        self._skipped.add(step)
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        dst = self.directory.parent / "checkpoints_bad" / f"{step}-{int(time.time())}"
        try:
            move_tree(src, dst)
        except OSError as e:
            warn(f"could not move checkpoint step {step} aside ({first_line(e)}); skipping it")
        self.mngr.reload()

    def reached_preemption(self, step: int) -> bool:
        try:
            return bool(self.mngr.reached_preemption(step))
        except (RuntimeError, ValueError, AttributeError):  # no distributed preemption service on one host
            return False


def config_meta(cfg: Config, step: int, eval_metrics: dict | None = None) -> dict:
    return {"step": int(step), "config_yaml": config_to_yaml(cfg), "eval": eval_metrics or {}}
