"""Shared pytest setup: tiny configs, fault-injection hooks, repo paths, hardware markers.

Every test builds its config from `TINY` (Levanter-style CPU tests: 1 block of width 32, 2
heads, sequence 32) plus the overrides it is about, through the `tiny` fixture, instead of
copying its own override list. Paths are absolute (`ROOT`), never relative to the cwd.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

# Tests compare numerics at fp32 tolerances; keep XLA's CPU logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

TINY = (
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.iterations=2",
    "model.max_iterations=2",
    "data.seq_len=32",
    "data.difficulty=2",
    "data.prefetch=0",
    "train.batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_batches=1",
    "train.progress=false",
    "train.tensorboard=false",
)


def tiny_config(*extra: str, base: str | Path | None = None):
    """TINY (+ extra overrides) on top of `base` (default: the schema defaults)."""
    from asura.config import load_config

    return load_config(base, [*TINY, *extra])


@pytest.fixture
def tiny():
    """Factory: tiny(*overrides) -> a validated Config built on TINY."""
    return tiny_config


def train_main():
    """train.py's main(argv) -> exit status (the script is not a module: loaded from its file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("asura_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def train_demo(wd, *overrides, config=DEMO):
    """A real train.py run of `config` (default configs/demo.yaml) for 2 steps, evaluated and checkpointed
    at step 2, no progress bar or TensorBoard; overrides come last. Returns the workdir."""
    flags = ["train.steps=2", "train.batch_size=8", "train.eval_batches=1", "train.eval_every=2",
             "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false"]  # fmt: skip
    assert train_main()(["--config", str(config), "--workdir", str(wd), *flags, *overrides]) == 0
    return wd


def quiet(_msg: str) -> None:
    pass


def stop_at(step: int):
    """Hooks that stop a run right after `step` steps with no extra save: what a kill leaves."""
    from asura.train.loop import Hooks

    return Hooks(after_step=lambda done: done >= step)


def poison(steps):
    """Hooks that make the loss NaN at the given 0-based steps (the loss mask is the only float input)."""
    from asura.train.loop import Hooks

    steps = set(steps)

    def before(step: int, batch: dict) -> dict:
        if step not in steps:
            return batch
        return {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}

    return Hooks(before_step=before)


def random_model(cfg, seed: int = 0, scale: float = 1.0, bias_std: float = 0.1):
    """A LoopedLM with every parameter random (numpy, no init compile).

    Adapters start with ΔW = 0 and norms at 1/0, which would hide indexing bugs, so tests use
    random values everywhere: matrices ~ N(0, scale²/fan_in), norm scales ~ 1 + N(0, 0.1²),
    biases ~ N(0, bias_std²); ABBA/LoRA factors all nonzero.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from asura.model import LoopedLM

    model = nnx.eval_shape(lambda: LoopedLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        z = rng.standard_normal(x.shape).astype(np.float32)
        if name == "scale":
            return jnp.asarray(1 + 0.1 * z)
        if name == "bias":
            return jnp.asarray(bias_std * z)
        return jnp.asarray(z * scale / np.sqrt(x.shape[-2] if x.ndim >= 2 else 1))

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))
    return model


def _backend() -> str:
    import jax

    return jax.default_backend()


def pytest_collection_modifyitems(config, items):
    needs = {"gpu": "needs an NVIDIA GPU", "tpu": "needs a TPU"}
    backend = None
    for item in items:
        for marker, reason in needs.items():
            if marker in item.keywords:
                backend = backend or _backend()
                if backend != marker:
                    item.add_marker(pytest.mark.skip(reason=f"{reason} (backend is {backend})"))


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS emulator on loopback for this test process (tests/gcs_emulator.py); its URL. The
    environment points google-cloud-storage, gcsfs and tensorstore at it, for this process and the
    subprocesses tests start. Skipped where the `gcs` extra is not installed."""
    import asura.storage  # noqa: F401 - before gcsfs is imported (asura/storage/__init__.py says why)

    pytest.importorskip("gcsfs", reason="gs:// tests need the gcs extra (pip install 'asura[gcs]')")
    pytest.importorskip("gcp_storage_emulator", reason="gs:// tests need gcp-storage-emulator (the gcs extra)")
    import gcs_emulator

    proc, url = gcs_emulator.start(tmp_path_factory.mktemp("gcs") / "emulator.log")
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    yield url
    proc.kill()
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs(gcs_server, request):
    """A fresh gs:// prefix in the emulator's bucket, unique to this test."""
    import gcs_emulator

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    return f"gs://{gcs_emulator.BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
