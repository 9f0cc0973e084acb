"""train.init_from: start a run from another run's trained parameters (fine-tuning).

MaxText's `load_parameters_path`, with the checks up front: `resolve(cfg)` runs before anything is
compiled or opened (train.py's preflight) and names, in one line, a source that has no checkpoint,
whose checkpoint does not verify, or whose parameters do not fit this config (the first parameter
whose shape or dtype differs). Only the parameters are taken: the optimiser state, the lr schedule,
the step, the data order and the RNG start fresh from this run's config.

The source is pinned: `pinned(cfg, source)` rewrites train.init_from to the exact step directory,
so config.yaml records which step a fine-tune started from, and a later step in the source run
cannot change what a rerun of the same workdir would have started from. The source is read only
when this workdir has no checkpoint: a resume continues its own (train.init_from is harmless on
resume, asura.train.checkpoint.HARMLESS_KEYS).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from asura.config import Config
from asura.storage.paths import StorageError, is_remote, to_path
from asura.train.preflight import PreflightError
from asura.train.resume import checkpoint_steps, newest_saved, saved_at


class InitFromError(PreflightError):
    """A train.init_from that cannot start this run; one line."""


class Source(NamedTuple):
    workdir: Any  # etils.epath.Path of the source run
    step: int
    cfg: Config  # the config that step was trained with (its own meta)

    @property
    def path(self) -> str:
        return str(self.workdir / "checkpoints" / str(self.step))


def resolve(cfg: Config) -> Source | None:
    """The checkpoint train.init_from names, checked against this config; reads its meta only."""
    import jax

    where = cfg.train.init_from
    if not where:
        return None
    try:
        p = to_path(where)
    except StorageError as e:
        raise InitFromError(f"train.init_from: {e}") from None
    if not is_remote(p):  # pinned as an absolute path: config.yaml names it wherever the run is read
        p = to_path(Path(os.fspath(p)).expanduser().resolve())
    if p.name.isdigit() and p.parent.name == "checkpoints":
        workdir, step = p.parent.parent, int(p.name)
        if not p.exists():
            have = checkpoint_steps(workdir)
            raise InitFromError(f"train.init_from={where}: no step {step}; the run has steps {have or 'none'}")
        saved = saved_at(workdir, step)  # resume's rule: committed, and its sealed meta reads
        if saved is None:
            raise InitFromError(
                f"train.init_from={where}: checkpoint step {step} is not committed or has no readable config; "
                "name another step as <workdir>/checkpoints/<step>"
            )
        src_cfg = saved.cfg
    else:
        if jax.process_count() > 1:  # each process would pick the newest step on its own, perhaps another
            raise InitFromError(
                f"train.init_from={where}: a multi-process run must name the step, as <workdir>/checkpoints/<step>, "
                "so that every process starts from the same one"
            )
        saved = newest_saved(p)  # resume's rule: the newest committed step whose sealed meta reads
        if saved is None:
            raise InitFromError(
                f"train.init_from={where} has no readable checkpoint (expected {p / 'checkpoints'}/<step>/); "
                "name a trained run's workdir or one of its checkpoints/<step> directories"
            )
        workdir, step, src_cfg = p, saved.step, saved.cfg
    _check_shapes(src_cfg, cfg, f"train.init_from={where} (step {step})")
    return Source(workdir, step, src_cfg)


def _param_shapes(cfg: Config) -> dict[str, tuple]:
    import jax

    from asura.train.state import abstract_state

    params = abstract_state(cfg).state["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flat}


def _check_shapes(src: Config, dst: Config, what: str) -> None:
    a, b = _param_shapes(src), _param_shapes(dst)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            have = "absent" if key not in a else f"{a[key][0]} {a[key][1]}"
            need = "absent" if key not in b else f"{b[key][0]} {b[key][1]}"
            raise InitFromError(
                f"{what}: parameter {key} is {have} there but {need} in this config; the model's "
                "parameter shapes must match (same widths, layers, max_iterations, adapters, gate)"
            )


def pinned(cfg: Config, source: Source | None) -> Config:
    """cfg with train.init_from naming the exact step directory it starts from."""
    if source is None or cfg.train.init_from == source.path:
        return cfg
    return cfg.replace(train=dataclasses.replace(cfg.train, init_from=source.path))


def kept(cfg: Config, saved: Config) -> Config:
    """A resumed run's config with train.init_from as its checkpoint saved it (the pinned step), whatever
    the command line says now: the parameters came from there, and a source that has trained on since
    (or been deleted) changes nothing."""
    if cfg.train.init_from == saved.train.init_from:
        return cfg
    return cfg.replace(train=dataclasses.replace(cfg.train, init_from=saved.train.init_from))


def load_params(source: Source, placement) -> dict:
    """The source step's parameters, restored straight onto this run's placement (every leaf of the
    source's state gets this run's sharding, so no host holds an unsharded copy); raises InitFromError
    when the step does not restore."""
    from asura.train.checkpoint import CheckpointStore
    from asura.train.state import abstract_state

    store = CheckpointStore(source.workdir / "checkpoints", keep=1, async_save=False, read_only=True)
    try:
        target = placement.abstract(abstract_state(source.cfg).state)
        attempt = store.attempt(source.step, lambda s: store.restore(s, target)[0]["params"])
    finally:
        store.close()
    if attempt.why is not None:
        raise InitFromError(
            f"train.init_from: checkpoint step {source.step} of {source.workdir} does not restore: {attempt.why}"
        )
    return attempt.value
