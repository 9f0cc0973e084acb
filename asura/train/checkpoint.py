"""Orbax checkpoints: async saves, keep-last-N plus best-by-eval-loss, resume from the latest VALID step.

Each step directory holds three items:
    state  StandardSave of the train-state pytree (params, opt_state, step, rng, counters)
    data   JsonSave of the data iterator's state (so a resume never replays data)
    meta   JsonSave of {step, config (resolved YAML), eval metrics}

A step that fails to restore (corrupt/partial) is moved to ``checkpoints_bad/`` with a
warning and the previous step is tried. Orbax writes into a temporary directory and
renames on commit, so a save killed half-way never shows up as a step.
"""

from __future__ import annotations

import base64
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from asura.config import Config, config_to_dict, config_to_yaml

BEST_METRIC = "eval_loss"

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


def _preservation(keep: int):
    try:
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    except ImportError:  # older orbax: keep last N only
        return None
    return pp.AnyPreservationPolicy(
        [
            pp.LatestN(keep),
            pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ]
    )


def first_line(e: BaseException) -> str:
    """An exception's first line, capped: orbax errors can run to pages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class CheckpointStore:
    def __init__(self, directory: Path, *, keep: int, async_save: bool):
        self.directory = Path(directory).resolve()
        policy = _preservation(keep)
        kwargs: dict[str, Any] = {"preservation_policy": policy} if policy is not None else {"max_to_keep": keep}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True, **kwargs
        )
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def save(self, step: int, state, data_state, meta: dict, *, eval_loss: float | None = None) -> bool:
        metrics = {BEST_METRIC: float(eval_loss)} if eval_loss is not None else None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return self.mngr.save(step, args=args, metrics=metrics, force=True)

    def steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(self.mngr.all_steps())

    def best_step(self) -> int | None:
        return self.mngr.best_step()

    def restore(self, step: int, abstract_state) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of one step; raises whatever orbax raises for a bad step."""
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

    def restore_latest_valid(self, abstract_state, *, warn=None) -> tuple[int, Any, Any, dict] | None:
        """(step, state, data_state, meta) from the newest step that restores; None if there is none."""
        warn = warn or (lambda m: warnings.warn(m, stacklevel=2))
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # any failure means this step is unusable
                warn(f"checkpoint step {step} is unreadable ({type(e).__name__}: {first_line(e)}); falling back")
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Move a bad step aside so orbax never lists it again (and a later save can reuse the number)."""
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory.parent / "checkpoints_bad" / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
        self.mngr.reload()

    def reached_preemption(self, step: int) -> bool:
        try:
            return bool(self.mngr.reached_preemption(step))
        except Exception:  # no distributed preemption service on a single host
            return False

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def config_meta(cfg: Config, step: int, eval_metrics: dict | None = None) -> dict:
    return {"step": int(step), "config_yaml": config_to_yaml(cfg), "eval": eval_metrics or {}}
