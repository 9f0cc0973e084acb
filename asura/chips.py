"""One table of accelerator facts: peak bf16 FLOP/s, HBM, cores, interconnect bandwidth.

Read by MFU (asura.mfu), the TPU compile check (asura.aot: generation names, HBM per chip, torus
dimensions, ICI/DCN bandwidth for the multi-slice roofline) and the kernels' lowering targets
(asura.kernels.lowering: device kind, cores, platform). Numbers are the vendors' published ones,
each with its source; a fact not published where we looked is None, never a guess.

Bandwidths per chip:
* ``ici_GBps``: bidirectional inter-chip interconnect, GB/s (TPU docs "Bidirectional ICI
  bandwidth (per chip)"); one direction carries half.
* ``dcn_Gbps``: data-center network, Gbit/s per chip (v5p: published per chip; v5e: the host's
  2 x 100 Gbit/s NICs over its 8 chips, which the pod total 6.4 Tbit/s over 256 chips confirms).

Pure python: imported by config-time code.
"""

from __future__ import annotations

from dataclasses import dataclass

from asura.registry import Registry


@dataclass(frozen=True)
class Chip:
    device_kind: str  # as jax reports it (jax.devices()[0].device_kind)
    platform: str  # jax platform: tpu | gpu
    peak_bf16_flops: float  # dense, no sparsity
    hbm_gib: float  # per chip, the vendor's number (XLA reserves a little: v5e compiles into 15.75G)
    cores: int  # TensorCores per device (TPU) or SMs (GPU): jax's AbstractDevice num_cores
    source: str  # where the numbers come from
    kinds: tuple[str, ...] = ()  # lower-cased device_kind substrings that identify it (besides its own)
    torus_dims: int = 0  # TPU topology name dimensions (v5e:16x16, v5p:4x4x4); 0 for GPUs
    ici_GBps: float | None = None  # bidirectional ICI per chip, GB/s
    dcn_Gbps: float | None = None  # data-center network per chip, Gbit/s
    chip_config: str = "default"  # libtpu's topology chip config: "megacore" makes one device of a 2-core chip

    def matches(self, device_kind: str) -> bool:
        kind = device_kind.lower()
        return any(k in kind for k in (self.device_kind.lower(), *self.kinds))


CHIPS: Registry[Chip] = Registry("chip", "accelerators asura has published facts for")
# Order matters for matching a device_kind: the more specific first ("tpu v5 lite" before "tpu v5").
CHIPS.add("v5e", Chip(
    "TPU v5 lite", "tpu", 197e12, 16.0, 1, "cloud.google.com/tpu/docs/v5e", ("tpu v5e",), 2, 400.0, 25.0,
))  # fmt: skip
CHIPS.add("v6e", Chip(
    "TPU v6 lite", "tpu", 918e12, 32.0, 1, "cloud.google.com/tpu/docs/v6e", ("tpu v6e",), 2, 800.0, None,
))  # fmt: skip
CHIPS.add("v5p", Chip(
    "TPU v5", "tpu", 459e12, 95.0, 2, "cloud.google.com/tpu/docs/v5p", ("tpu v5p",), 3, 1200.0, 50.0,
))  # fmt: skip
# libtpu's default v4 config is one device per TensorCore (16 for a 2x2x2); megacore, as jax runs it
CHIPS.add("v4", Chip("TPU v4", "tpu", 275e12, 32.0, 2, "cloud.google.com/tpu/docs/v4", (), 3, chip_config="megacore"))
CHIPS.add("a100", Chip("NVIDIA A100-SXM4-80GB", "gpu", 312e12, 80.0, 108, "NVIDIA A100 datasheet (SXM)", ("a100",)))
# SXM dense; PCIe parts peak lower (756 TFLOP/s) and are not matched separately
CHIPS.add("h100", Chip("NVIDIA H100 80GB HBM3", "gpu", 989e12, 80.0, 132, "NVIDIA H100 datasheet (SXM)", ("h100",)))
CHIPS.add("h200", Chip("NVIDIA H200", "gpu", 989e12, 141.0, 132, "NVIDIA H200 datasheet (SXM)", ("h200",)))


def chip_for(device_kind: str) -> Chip | None:
    """The chip a jax device_kind names, or None (never a guess)."""
    return next((chip for _, chip in CHIPS.items() if chip.matches(device_kind)), None)


def tpu_generations() -> tuple[str, ...]:
    """The names a TPU topology may start with (v5e:16x16)."""
    return tuple(sorted(name for name, chip in CHIPS.items() if chip.platform == "tpu"))
