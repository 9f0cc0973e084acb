"""Checks that must fail before any compilation: data, workdir, devices, mesh, batch split, memory, packages.

Each raises a ValueError subclass with one line naming the problem and what would work, so
train.py exits 2 in seconds instead of after a long compile (or an out-of-memory kill).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from asura.config import Config
from asura.storage.paths import is_remote
from asura.train.workdir import WorkdirError, check_writable


class PreflightError(ValueError):
    """A run that cannot work on this machine as configured; one line."""


def check_devices(cfg: Config, n_devices: int, process_count: int = 1, slices: int = 1, granule: str = "slice") -> None:
    """The mesh must use exactly the devices there are (in `slices` granules: TPU slices or
    processes, asura.parallel.mesh.granules), and the batch must split over its `batch` rule."""
    from asura.parallel.mesh import batch_split, mesh_levels

    sizes = mesh_levels(cfg.mesh, n_devices, slices, granule).sizes  # MeshError (one line) when it does not fit
    rows = batch_split(cfg.mesh.rules, sizes)
    if cfg.train.batch_size % (rows * cfg.train.grad_accum):
        axes = " x ".join(cfg.mesh.rules.get("batch", ())) or "(no axes)"
        raise PreflightError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by mesh {axes} ({rows}) x "
            f"train.grad_accum ({cfg.train.grad_accum}) on {n_devices} device(s)"
        )
    if cfg.train.batch_size % process_count:
        raise PreflightError(f"train.batch_size={cfg.train.batch_size} is not divisible by {process_count} processes")


def activation_bytes_lower_bound(cfg: Config) -> int:
    """A LOWER bound on peak memory of one train step: params + Adam state, and the attention
    scores of one layer when the XLA path materialises them (B·N·T² fp32). Real use is higher;
    this only catches configs that cannot possibly fit."""
    from asura.flops import param_count

    m, t = cfg.model, cfg.train
    state = 16 * param_count(cfg).unique  # fp32 params, grads, Adam mu and nu
    micro = t.batch_size // t.grad_accum
    scores = 4 * micro * m.n_heads * cfg.data.seq_len**2 if m.attention in ("xla", "auto") else 0
    return state + scores


def device_memory_bytes() -> int | None:
    """Memory of one device: the accelerator's limit, or this host's RAM on a CPU."""
    import jax

    dev = jax.local_devices()[0]  # a multi-process job sees devices it cannot query
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if dev.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_memory(cfg: Config) -> None:
    need, have = activation_bytes_lower_bound(cfg), device_memory_bytes()
    if have is not None and need > have:
        gib = 1 << 30
        raise PreflightError(
            f"this config needs at least {need / gib:.1f} GiB per device (params + Adam state + one layer's "
            f"{cfg.data.seq_len}x{cfg.data.seq_len} attention scores), the device has {have / gib:.1f} GiB; "
            "lower data.seq_len or train.batch_size, raise train.grad_accum, or use model.attention=pallas"
        )


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of one checkpoint's arrays: params plus Adam's mu and nu, in the parameter dtype."""
    import numpy as np

    from asura.flops import param_count

    return 3 * np.dtype(cfg.model.param_dtype).itemsize * param_count(cfg).unique


LOG_MARGIN = 64 << 10  # config.yaml and the first metrics records and TensorBoard events (~1 KiB each)


def check_disk(cfg: Config, workdir) -> None:
    """Refuse a workdir whose filesystem cannot hold even one checkpoint, before any file is written
    (a local one: a bucket does not fill)."""
    import shutil

    if is_remote(workdir):
        return
    workdir = Path(os.fspath(workdir))
    probe = workdir if workdir.exists() else next((p for p in workdir.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    need = checkpoint_bytes(cfg) + LOG_MARGIN
    if free < need:
        raise PreflightError(
            f"workdir {workdir}: {free:,} bytes free on its filesystem, one checkpoint and the logs need about "
            f"{need:,}; free some space or use another --workdir"
        )


def check_packages(cfg: Config) -> None:
    if cfg.data.source in ("task", "text") and importlib.util.find_spec("grain") is None:
        raise PreflightError(
            f"data.source={cfg.data.source} needs the grain package (pip install grain); "
            "data.source=synthetic runs without it"
        )
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise PreflightError("train.wandb=true needs the wandb package: pip install 'asura[wandb]' (or wandb)")


def preflight(cfg: Config, workdir) -> None:
    """Everything the train loop checks before building the model (imports JAX, compiles nothing):
    the data against the model and batch, the workdir, packages, devices and memory."""
    import jax

    from asura.data import check_compatible

    try:
        check_compatible(cfg, process_count=jax.process_count())
    except ValueError as e:  # the data checks' contract: one-line ValueErrors
        raise PreflightError(str(e)) from None
    check_writable(workdir)
    check_disk(cfg, workdir)
    check_packages(cfg)
    from asura.parallel.mesh import dcn_span, granules

    check_devices(cfg, jax.device_count(), jax.process_count(), *granules(jax.devices(), dcn_span(cfg.mesh)))
    check_memory(cfg)


__all__ = ["PreflightError", "WorkdirError", "preflight"]
