"""Lower (not run) code for an accelerator this machine does not have.

Inside `target("h100")` jax traces and lowers as if the default device were that chip: the
Pallas kernels go through their real Triton or Mosaic lowerings instead of interpret mode,
and attention dispatch picks what it would pick there. That checks, on a CPU, everything up
to the vendor compiler: unsupported primitives, block-shape rules, grid and BlockSpec
plumbing, the custom VJP. Compiling the result needs the chip itself; for Triton,
`bench/triton_aot.py` takes the lowered kernels on through Triton and ptxas to sm_90 code.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import jax

from asura.chips import CHIPS

LOWERING_PLATFORM = {"gpu": "cuda", "tpu": "tpu"}  # jax platform -> lowering platform of our kernels


def _target(chip: str) -> tuple[str, int, str, str]:
    c = CHIPS[chip]
    return c.device_kind, c.cores, c.platform, LOWERING_PLATFORM[c.platform]


# name -> (device_kind, cores, jax platform, lowering platform), from the chip table (asura.chips)
TARGETS: dict[str, tuple[str, int, str, str]] = {
    "h100": _target("h100"),
    "a100": _target("a100"),
    "tpu-v5e": _target("v5e"),
    "tpu-v4": _target("v4"),
}

# Custom-call targets our kernels lower to, per lowering platform.
KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def target_platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the chip being lowered for (an abstract target if one is set), else the host's."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    device = getattr(get(), "abstract_device", None) if get else None
    return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def target(name: str) -> Iterator[str]:
    """Trace and lower as if on chip `name` (see TARGETS); yields the lowering platform."""
    if name not in TARGETS:
        raise ValueError(f"unknown lowering target {name!r}; choose one of {', '.join(TARGETS)}")
    if not hasattr(jax.sharding, "AbstractDevice"):
        raise RuntimeError(f"lowering for {name} needs jax.sharding.AbstractDevice (jax>=0.12), have {jax.__version__}")
    kind, cores, platform, lowering_platform = TARGETS[name]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("_target",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield lowering_platform


def lower(fn: Callable, *args, target_name: str) -> jax.stages.Lowered:
    """jax.jit(fn) traced on `args` (arrays or ShapeDtypeStructs) and lowered for `target_name`."""
    with target(target_name) as platform:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def kernel_calls(lowered: jax.stages.Lowered, lowering_platform: str) -> list[str]:
    """The custom calls of our kernels in a lowered module, in program order, one entry per call.

    Each entry is the kernel's pallas_call name (e.g. flash_dq_gpu) where the call records one.
    """
    call = KERNEL_CALLS[lowering_platform]
    names = []
    for line in lowered.as_text().splitlines():
        if f"custom_call @{call}(" not in line:
            continue
        m = re.search(r'name = "([^"]+)"', line)
        names.append(m.group(1) if m else call)
    return names
