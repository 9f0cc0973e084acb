"""Load a trained LoopedLM (and its config) from a workdir or a checkpoint path.

Accepted paths (layout written by ``asura.train.loop.run``):
    workdir/                     latest valid step (or ``step=``)
    workdir/checkpoints/         same
    workdir/checkpoints/<step>/  that step
Restoring goes through ``asura.train.checkpoint.CheckpointStore`` and
``asura.train.state.abstract_state``, so this reads exactly the format the train
loop writes. The config is each checkpoint's own (saved in its meta item). Every failure is a
``LoadError`` with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asura.storage.paths import StorageError, is_remote, to_path


class LoadError(ValueError):
    """A missing or invalid workdir/checkpoint; the message is one line."""


@dataclass
class Loaded:
    model: Any  # LoopedLM with the restored parameters
    cfg: Any  # asura.config.Config
    step: int
    workdir: Any  # etils.epath.Path: local or gs://


def resolve(path, step: int | None = None) -> tuple[Any, int | None]:
    """(workdir, step) from any accepted path (local or gs://); a step directory fixes the step."""
    try:
        p = to_path(path)
    except StorageError as e:
        raise LoadError(str(e)) from None
    if not is_remote(p):
        p = to_path(Path(os.fspath(p)).expanduser().resolve())
    if not p.exists():
        raise LoadError(f"workdir {p} does not exist")
    if not p.is_dir():
        raise LoadError(f"{p} is not a directory (expected a workdir or checkpoints/<step>)")
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if step is not None and step != int(p.name):
            raise LoadError(f"path names step {p.name} but step={step} was given")
        return p.parent.parent, int(p.name)
    if p.name == "checkpoints" and not (p / "checkpoints").exists():
        return p.parent, step
    return p, step


def model_from_params(cfg, params):
    """A LoopedLM holding ``params`` (a pure param dict, e.g. ``run(...)["params"]``)."""
    from asura.train.state import abstract_state, merge_model

    built = abstract_state(cfg)
    return merge_model(built.graphdef, params, built.rest)


def checkpoint_steps(workdir) -> list[int]:
    """The workdir's checkpoint steps, ascending (asura.train.resume.checkpoint_steps)."""
    from asura.train.resume import checkpoint_steps as steps

    return steps(workdir)


def _meta_config(store, step: int):
    """The config a checkpoint step was trained with (its own meta: the authority on resume too)."""
    from asura.config import ConfigError, config_from_yaml

    try:
        return config_from_yaml(store.read_meta(step)["config_yaml"])
    except (ConfigError, KeyError) as e:
        raise LoadError(f"checkpoint step {step} holds no valid config: {e}") from None


def with_extrapolation(cfg, extrapolation: str | None):
    """cfg with model.extrapolation chosen at evaluation time: it only decides which per-iteration
    slice runs past max_iterations, so the trained parameters are unchanged."""
    if extrapolation is None or extrapolation == cfg.model.extrapolation:
        return cfg
    from asura.config import ConfigError, with_overrides

    try:
        return with_overrides(cfg, {"model.extrapolation": extrapolation})
    except ConfigError as e:
        raise LoadError(str(e)) from None


def load(path: str | Path, step: int | str | None = None, *, extrapolation: str | None = None, warn=None) -> Loaded:
    """Restore the model at ``step``: an int, "latest" / None (the newest step that restores),
    or "best" (lowest eval ce). Read-only: nothing in the workdir is moved or written.

    The config is the checkpoint's own; ``extrapolation`` (none | last | cycle) may be chosen
    here, at evaluation time, to run depths past model.max_iterations without retraining.
    """
    if isinstance(step, str) and step.isdigit():
        step = int(step)
    if step not in (None, "latest", "best") and not isinstance(step, int):
        raise LoadError(f"step must be an integer, 'latest' or 'best', got {step!r}")
    workdir, from_path = resolve(path, step if isinstance(step, int) else None)
    if from_path is not None:  # a checkpoints/<step> path names its step
        step = from_path
    steps = checkpoint_steps(workdir)
    if not steps:
        raise LoadError(f"{workdir} has no checkpoints (expected {workdir / 'checkpoints'}/<step>/)")
    if isinstance(step, int) and step not in steps:
        raise LoadError(f"step {step} not found in {workdir / 'checkpoints'}; available: {steps}")

    from asura.train.checkpoint import CheckpointStore
    from asura.train.state import abstract_state, merge_model

    store = CheckpointStore(workdir / "checkpoints", keep=1, async_save=False, read_only=True)
    try:
        if step == "best":
            step = store.best_step()
            if step is None:
                raise LoadError(f"{workdir} has no step with an eval ce to rank (train with eval_every <= steps)")

        def restore(s):  # each step with its own config: a workdir may hold runs of other settings
            cfg = with_extrapolation(_meta_config(store, s), extrapolation)
            built = abstract_state(cfg)
            return Loaded(merge_model(built.graphdef, store.restore(s, built.state)[0]["params"], built.rest),
                          cfg, int(s), workdir)  # fmt: skip

        candidates = [step] if isinstance(step, int) else sorted(steps, reverse=True)
        for s in candidates:
            attempt = store.attempt(s, restore)
            if attempt.why is None:
                return attempt.value
            if isinstance(step, int):
                raise LoadError(f"checkpoint step {s} in {workdir} does not restore: {attempt.why}")
            if warn is not None:
                warn(f"checkpoint step {s} is unreadable ({attempt.why}); trying the previous one")
        raise LoadError(f"no checkpoint in {workdir / 'checkpoints'} restores")
    finally:
        store.close()
