"""Shared pytest setup: hardware markers skip cleanly without the hardware."""

import os

import pytest

# Tests compare numerics at fp32 tolerances; keep XLA's CPU matmuls exact-ish and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
