"""Before anything in the workdir is opened: what the newest checkpoint allows this run to change.

`plan_resume(cfg, workdir, extend)` reads the newest readable checkpoint's saved config (its meta
item only; nothing is written, locked or moved) and returns the config this run will actually use:

* a config that changes the run's maths is refused here, in one line, before the lock, the
  metrics log, TensorBoard or the progress bar exist (`check_resume_config`; the restore checks
  every step it tries again, since an older step may be the one that restores);
* the schedule events of an extended run (`train.hold_at`, `train.rewarm_at`) are inherited from
  the checkpoint: they are history, and rerunning the command that extended a run after a kill
  must give the same schedule;
* `extend` ("continue" | "rewarm") adds the event that makes a changed train.steps leave every
  trained step's lr alone (asura.train.optim). Without it, a train.steps change that would alter
  the lr of trained steps is refused with both choices named.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

from asura.config import Config, ConfigError, config_from_dict, config_from_yaml, config_to_dict
from asura.storage.paths import is_remote, to_path
from asura.train.checkpoint import ConfigMismatchError, check_resume_config
from asura.train.integrity import check_seal

EXTEND = {
    "continue": "hold_at",  # keep the old schedule: its cosine ends at the old train.steps, then the lr holds
    "rewarm": "rewarm_at",  # at the old train.steps warm up again to train.lr, then cosine to the new train.steps
}


class Saved(NamedTuple):
    step: int
    cfg: Config


class Plan(NamedTuple):
    cfg: Config  # the config to train with (schedule events inherited / added)
    saved: Saved | None  # the newest readable checkpoint, None for a fresh run
    notes: list[str]  # one-line messages for the user (what an extension does)


META_FILE = ("meta", "metadata")  # where orbax's JsonCheckpointHandler (default filename) keeps the meta item


def checkpoint_steps(workdir) -> list[int]:
    """The step directories under workdir/checkpoints, ascending (committed or not)."""
    ckpt = to_path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def saved_at(workdir, step: int) -> Saved | None:
    """Step `step` with its config when it is committed and its sealed meta reads; None otherwise.

    Reads the meta JSON directly (no orbax manager, no JAX), so a refusal costs nothing."""
    step_dir = to_path(workdir) / "checkpoints" / str(step)
    # committed: locally orbax renames a temporary dir to the step's name; on gs:// (no atomic rename)
    # it writes straight to the step's dir and marks the commit with a file
    if is_remote(step_dir) and not (step_dir / "commit_success.txt").exists():
        return None
    try:
        meta = json.loads(step_dir.joinpath(*META_FILE).read_text())
        check_seal(meta)
        return Saved(step, config_from_yaml(meta["config_yaml"]))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):  # unreadable, torn, edited, foreign
        return None


def newest_saved(workdir) -> Saved | None:
    """The newest committed checkpoint whose meta reads and whose seal holds; None when there is none.
    A step whose meta does not read is skipped here (the restore decides what to do with it)."""
    for step in reversed(checkpoint_steps(workdir)):
        if (saved := saved_at(workdir, step)) is not None:
            return saved
    return None


def _with_events(cfg: Config, hold_at, rewarm_at) -> Config:
    try:
        train = dataclasses.replace(cfg.train, hold_at=tuple(sorted(hold_at)), rewarm_at=tuple(sorted(rewarm_at)))
        return config_from_dict(config_to_dict(cfg.replace(train=train)))  # validated
    except ConfigError as e:
        raise ConfigMismatchError(f"cannot extend this run: {e}") from None


def describe_extension(old: Config, new: Config, how: str) -> str:
    o, n = old.train, new.train
    head = f"extending train.steps {o.steps} -> {n.steps}"
    if how == "continue":
        return f"{head}: the old schedule runs to step {o.steps}, then the lr holds (train.hold_at={list(n.hold_at)})"
    return (
        f"{head}: at step {o.steps} the lr warms up again to {o.lr:g} over {o.warmup_steps} steps, then "
        f"decays to step {n.steps} (train.rewarm_at={list(n.rewarm_at)})"
    )


def plan_resume(cfg: Config, workdir, extend: str | None = None) -> Plan:
    """See the module docstring. Raises ConfigMismatchError (one line) for a change it refuses."""
    if extend is not None and extend not in EXTEND:
        raise ConfigMismatchError(f"--extend={extend!r} is not valid; choose one of {', '.join(EXTEND)}")
    saved = newest_saved(workdir)
    if saved is None:
        if extend is not None:
            raise ConfigMismatchError(f"--extend {extend}: workdir {workdir} has no checkpoint to extend")
        return Plan(cfg, None, [])
    old = saved.cfg
    hold = set(old.train.hold_at) | set(cfg.train.hold_at)
    rewarm = set(old.train.rewarm_at) | set(cfg.train.rewarm_at)
    notes = []
    at = old.train.steps
    if extend is not None and cfg.train.steps != at and at not in hold | rewarm:
        (hold if EXTEND[extend] == "hold_at" else rewarm).add(at)
        new = _with_events(cfg, hold, rewarm)
        notes.append(describe_extension(old, new, extend))
    else:
        new = _with_events(cfg, hold, rewarm)
        if extend is not None:
            notes.append(f"--extend {extend}: train.steps is {cfg.train.steps} as saved, so there is nothing to extend")
    check_resume_config(old, new, saved.step)
    return Plan(new, saved, notes)
