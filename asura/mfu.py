"""Model FLOPs utilisation: achieved FLOP/s per device over the device's dense bf16 peak.

Peaks are the Levanter table (bf16 dense, no sparsity). An unknown device returns None,
never a guess; match is on ``jax.devices()[0].device_kind``.
"""

from __future__ import annotations

# (substring of the lower-cased device_kind, peak bf16 FLOP/s). Order matters: more specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # a bare "TPU v5" is the v5p
    ("tpu v6 lite", 918e12),  # v6e reports "TPU v6 lite"
    ("tpu v6e", 918e12),
    ("tpu v4", 275e12),
    ("a100", 312e12),
    ("h100", 989e12),  # SXM dense; PCIe parts peak lower (756) and are not matched separately
    ("h200", 989e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s for a ``device_kind`` string, or None when unknown."""
    kind = device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_sec_per_device: float, device_kind: str) -> float | None:
    """Fraction of peak (0..1) achieved, or None for a device we have no peak for."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_sec_per_device / peak


def local_device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind
