"""Orbax checkpoints: async saves, keep-last-N plus best-by-eval-ce, resume from the latest VALID step.

Each step directory holds three items:
    state  StandardSave of the train-state pytree (params, opt_state, step, counters)
    data   JsonSave of the data iterator's state (so a resume never replays data)
    meta   JsonSave of {step, config (resolved YAML), eval metrics}

A corrupt step (checksum or read failure, see asura.train.integrity) is moved to
``checkpoints_bad/`` with a warning and the previous step is tried; a step written by other
code (tree, shape, dtype) stops the resume with one line and moves nothing. Orbax writes
into a temporary directory and renames on commit, so a save killed half-way never shows up
as a step.
"""

from __future__ import annotations

import base64
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from asura.compat import orbax_preservation
from asura.config import Config, config_to_dict, config_to_yaml
from asura.train.integrity import first_tree_difference, verify, write_checksums

BEST_METRIC = "eval_ce"  # the final iteration's eval CE at the trained depth (asura.train.evaluate)

# Keys that may differ between the saved config and a resumed run's config. They change
# bookkeeping, not the maths of the run so far. Note: train.steps reshapes the cosine tail
# from the resume point onwards (extending a run is the common reason to change it).
HARMLESS_KEYS = frozenset(
    {
        "name",
        "train.steps",
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


def check_resume_config(old: Config, new: Config) -> list[str]:
    """Raise ConfigMismatchError on a harmful difference; return the harmless changed keys."""
    diff = config_diff(old, new)
    bad = {k: v for k, v in diff.items() if k not in HARMLESS_KEYS and not k.startswith(HARMLESS_PREFIXES)}
    if bad:
        desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in bad.items())
        raise ConfigMismatchError(
            f"workdir was trained with a different config ({desc}); use a new --workdir or the saved config.yaml"
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


class CheckpointMismatchError(ValueError):
    """A checkpoint this code cannot use as it is (another tree, shape, dtype or data pipeline).
    Nothing is moved: the checkpoint is fine, the code or config changed. One line."""


class CheckpointError(RuntimeError):
    """Resume cannot go on: steps exist but none restores; one line."""


class SaveError(RuntimeError):
    """A save failed (disk full, unwritable dir); one line with the path and the OS error.
    The previous committed step is untouched."""


CORRUPT = (OSError, ValueError, RuntimeError, KeyError)  # what orbax/tensorstore raise for bad files


class Attempt(NamedTuple):
    value: Any  # what the restore returned; None when it did not restore
    why: str | None  # None when it restored


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: Any
    meta: dict


class CheckpointStore:
    def __init__(self, directory: Path, *, keep: int, async_save: bool, read_only: bool = False):
        """read_only: for analysis; creates, cleans and deletes nothing."""
        self.directory = Path(directory).resolve()
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
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._unsummed: int | None = None  # the last saved step, until its checksums are written
        self._skipped: set[int] = set()  # unusable steps that could not be moved aside

    # ------------------------------------------------------------------- save
    def save(self, step: int, state, data_state, meta: dict, *, eval_ce: float | None = None) -> None:
        """Start an (async) save of one step; a failed save raises SaveError with one line."""
        self.wait()  # the previous save must be committed (and checksummed) before the next starts
        need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise SaveError(f"checkpoint {self.directory}/{step}: {free:,} bytes free, the state needs {need:,}")
        metrics = {BEST_METRIC: float(eval_ce)} if eval_ce is not None else None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            self.mngr.save(step, args=args, metrics=metrics, force=True)
        except CORRUPT as e:
            raise SaveError(f"saving checkpoint {self.directory}/{step} failed: {first_line(e)}") from None
        self._unsummed = step

    def wait(self) -> None:
        """Block until the last save is committed, then write its checksums; raises SaveError."""
        try:
            self.mngr.wait_until_finished()
        except CORRUPT as e:
            step = self._unsummed
            self._unsummed = None
            raise SaveError(f"saving checkpoint {self.directory}/{step} failed: {first_line(e)}") from None
        step, self._unsummed = self._unsummed, None
        if step is not None and jax.process_index() == 0 and (self.directory / str(step)).is_dir():
            write_checksums(self.directory / str(step))

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.mngr.close()

    # ---------------------------------------------------------------- restore
    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(s for s in self.mngr.all_steps() if s not in self._skipped)

    def best_step(self) -> int | None:
        """The kept step with the lowest eval ce (None when no kept step was evaluated)."""
        return self.mngr.best_step()

    def restore(self, step: int, abstract_state) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of one step; orbax's own errors for a bad step."""
        out = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = jax.block_until_ready(out["state"])
        return state, decode_data_state(out["data"]), dict(out["meta"])

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
        return dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

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
        except CORRUPT as e:
            return Attempt(None, f"{type(e).__name__}: {first_line(e)}")

    def restore_latest_valid(self, abstract_state, *, check_meta=None, apply_data=None, warn=None) -> Restored | None:
        """The newest step that is intact and restores; None when there are no steps at all.

        Corrupt steps (checksum, unreadable) are moved to checkpoints_bad/ and the previous is
        tried; a step from other code raises CheckpointMismatchError (nothing moved); when
        steps exist but none restores, CheckpointError refuses to retrain over them from 0.
        `check_meta(meta)` runs first on an intact step (it raises ConfigMismatchError for a config
        that changes the run's maths); `apply_data(data_state)` runs inside the fallback (it raises
        CheckpointMismatchError when the data pipeline cannot take the state).
        """
        warn = warn or (lambda m: warnings.warn(m, stacklevel=2))
        steps = self.steps()

        def restore(step):
            if check_meta is not None:
                check_meta(self.read_meta(step))
            self.check_tree(step, abstract_state)
            return self.restore(step, abstract_state)

        for step in reversed(steps):
            attempt = self.attempt(step, restore)
            if attempt.why is None:
                state, data_state, meta = attempt.value
                if apply_data is not None:
                    apply_data(data_state)
                return Restored(step, state, data_state, meta)
            warn(f"checkpoint step {step} is unreadable ({attempt.why}); falling back")
            self._quarantine(step, warn)
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores ({len(steps)} tried, see checkpoints_bad/); "
                "refusing to retrain from step 0 over them: move the directory aside to start afresh"
            )
        return None

    def _quarantine(self, step: int, warn) -> None:
        """Move a corrupt step aside so orbax never lists it again (a later save may reuse the number)."""
        self._skipped.add(step)
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        dst = self.directory.parent / "checkpoints_bad" / f"{step}-{int(time.time())}"
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
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
