"""Model FLOPs utilisation: achieved FLOP/s per device over the device's dense bf16 peak.

Peaks come from the chip table (asura.chips). An unknown device returns None, never a guess;
match is on ``jax.devices()[0].device_kind``.
"""

from __future__ import annotations

from asura.chips import chip_for


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s for a ``device_kind`` string, or None when unknown."""
    chip = chip_for(device_kind)
    return None if chip is None else chip.peak_bf16_flops


def mfu(flops_per_sec_per_device: float, device_kind: str) -> float | None:
    """Fraction of peak (0..1) achieved, or None for a device we have no peak for."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_sec_per_device / peak


def local_device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind
