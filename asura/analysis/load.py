"""Load a trained LoopedLM (and its config) from a workdir or a checkpoint path.

Accepted paths (layout written by ``asura.train.loop.run``):
    workdir/                     latest valid step (or ``step=``)
    workdir/checkpoints/         same
    workdir/checkpoints/<step>/  that step
Restoring goes through ``asura.train.checkpoint.CheckpointStore`` and
``asura.train.state.abstract_state``, so this reads exactly the format the train
loop writes. The config comes from ``workdir/config.yaml``. Every failure is a
``LoadError`` with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LoadError(ValueError):
    """A missing or invalid workdir/checkpoint; the message is one line."""


@dataclass
class Loaded:
    model: Any  # LoopedLM with the restored parameters
    cfg: Any  # asura.config.Config
    step: int
    workdir: Path


def resolve(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(workdir, step) from any accepted path; a step directory fixes the step."""
    p = Path(path).expanduser().resolve()
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


def read_config(workdir: str | Path):
    """The resolved config a workdir was trained with (``config.yaml``)."""
    from asura.config import ConfigError, config_from_yaml

    f = Path(workdir) / "config.yaml"
    if not f.is_file():
        raise LoadError(f"{Path(workdir)} has no config.yaml: not an asura workdir (written by `python train.py`)")
    try:
        return config_from_yaml(f.read_text())
    except ConfigError as e:
        raise LoadError(f"{f} is not a valid config: {e}") from None


def model_from_params(cfg, params):
    """A LoopedLM holding ``params`` (a pure param dict, e.g. ``run(...)["params"]``)."""
    from asura.train.state import abstract_state, merge_model

    graphdef, rest, _ = abstract_state(cfg)
    return merge_model(graphdef, params, rest)


def checkpoint_steps(workdir: str | Path) -> list[int]:
    ckpt = Path(workdir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(d.name) for d in ckpt.iterdir() if d.is_dir() and d.name.isdigit())


def load(path: str | Path, step: int | None = None, warn=None) -> Loaded:
    """Restore the model at ``step`` (default: the latest step that restores).

    With no step, unreadable steps are skipped exactly as a resume would
    (``CheckpointStore.restore_latest_valid`` moves them to ``checkpoints_bad/``).
    """
    workdir, step = resolve(path, step)
    cfg = read_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise LoadError(f"{workdir} has no checkpoints (expected {workdir / 'checkpoints'}/<step>/)")
    if step is not None and step not in steps:
        raise LoadError(f"step {step} not found in {workdir / 'checkpoints'}; available: {steps}")

    from asura.train.checkpoint import CheckpointStore, first_line
    from asura.train.state import abstract_state, merge_model

    graphdef, rest, abstract = abstract_state(cfg)
    store = CheckpointStore(workdir / "checkpoints", keep=max(cfg.train.keep_checkpoints, 1), async_save=False)
    try:
        if step is None:
            restored = store.restore_latest_valid(abstract, warn=warn)
            if restored is None:
                raise LoadError(f"no checkpoint in {workdir / 'checkpoints'} restores (see checkpoints_bad/)")
            step, state = restored[0], restored[1]
        else:
            try:
                state = store.restore(step, abstract)[0]
            except Exception as e:  # any orbax failure means this step is unusable
                raise LoadError(f"checkpoint step {step} in {workdir} does not restore: {first_line(e)}") from None
    finally:
        store.close()
    return Loaded(merge_model(graphdef, state["params"], rest), cfg, int(step), workdir)
