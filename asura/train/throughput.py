"""tokens/s -> TFLOP/s per device -> MFU, from the FLOP accountant (asura.flops, asura.mfu)."""

from __future__ import annotations

from typing import Any

from asura.config import Config


def train_flops_per_token(cfg: Config) -> float | None:
    """Expected training FLOPs per token under the depth schedule (None if the accountant fails)."""
    try:
        from asura.flops import flop_count

        return float(flop_count(cfg).train)
    except Exception:  # a missing/failed accountant must not stop training
        return None


def rates(cfg: Config, tokens_per_s: float, flops_per_token: float | None, placement: Any) -> dict[str, Any]:
    """Per-device throughput metrics; MFU is None on devices without a known peak (CPU)."""
    from asura.mfu import local_device_kind, mfu

    n_dev = max(int(getattr(placement, "n_devices", 1)), 1)
    out: dict[str, Any] = {
        "train/tokens_per_s": tokens_per_s,
        "train/tokens_per_s_per_device": tokens_per_s / n_dev,
    }
    if flops_per_token is not None:
        flops_dev = tokens_per_s * flops_per_token / n_dev
        out["train/tflops_per_device"] = flops_dev / 1e12
        out["train/mfu"] = mfu(flops_dev, local_device_kind())
    return out
