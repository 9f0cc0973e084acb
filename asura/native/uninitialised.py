"""Uninitialised buffers on the CPU too: ``empty`` allocates without a fill on every backend.

``jax.lax.empty`` is AllocateBuffer on GPU/TPU and a zero fill on the CPU. The while driver's
buffers have S = max_iterations rows however many steps run, so on the CPU a program compiled for
S = 16 and run at depth 2 spent most of its extra time writing zeros into rows nobody reads
(issue #18: remat none 1.37x the S = 2 step, block 1.13x). Here the CPU gets its own allocation: a
15-line FFI handler (``uninitialised.c``) that leaves the output as XLA allocated it.

The handler is compiled on first use with the system C compiler against the installed jaxlib's FFI
header and cached per (source, header) under ``$XDG_CACHE_HOME/asura`` (``~/.cache/asura``). Where
that fails (no compiler, a read-only cache and tmp, an FFI version mismatch), or with
``ASURA_UNINITIALISED=0``, ``empty`` falls back to ``jax.lax.empty`` (zeros on the CPU) and says
why once in the log: slower when iterations are skipped, never wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

from asura import compat

TARGET = "asura_uninitialised"
SOURCE = Path(__file__).with_name("uninitialised.c")
ENV = "ASURA_UNINITIALISED"  # "0": always jax.lax.empty (zeros on the CPU); for A/B timing
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Native:
    available: bool
    reason: str  # why not, or where the library is
    library: Path | None = None


def cache_dirs() -> list[Path]:
    """Where the library is built and looked for: the user cache, then the temp dir."""
    dirs = []
    with contextlib.suppress(RuntimeError):  # no home directory to be found
        dirs.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asura" / "native")
    return [*dirs, Path(tempfile.gettempdir()) / "asura-native"]


def _header() -> Path:
    return Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"


def build(directory: Path) -> Path:
    """Compile the handler into `directory` (once per source and FFI header) and return the library.
    Raises OSError or subprocess.CalledProcessError / TimeoutExpired with the compiler's message."""
    key = hashlib.sha256(SOURCE.read_bytes() + _header().read_bytes()).hexdigest()[:16]
    lib = directory / f"uninitialised-{key}.so"
    if lib.exists():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: parallel test workers may build at the same time.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [*shlex.split(os.environ.get("CC", "cc")), "-O2", "-shared", "-fPIC", "-std=c11",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


def locate(directories) -> Native:
    """The compiled handler from the first directory that has or can build it."""
    errors = []
    for directory in directories:
        try:
            lib = build(Path(directory))
            return Native(True, str(lib), lib)
        except subprocess.CalledProcessError as e:
            last = (e.stderr or "").strip().splitlines()
            errors.append(f"{e.cmd[0]} exited {e.returncode}: {last[-1] if last else ''}")
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{directory}: {e}")
    return Native(False, "could not compile uninitialised.c: " + "; ".join(errors))


_lock = threading.Lock()
_loaded: list[ctypes.CDLL] = []  # keeps the registered library mapped for the process


@functools.cache
def native() -> Native:
    """Build, load and register the CPU handler once per process; never raises."""
    if os.environ.get(ENV, "1") == "0":
        return Native(False, f"{ENV}=0")
    with _lock:
        found = locate(cache_dirs())
        if not found.available:
            return _fallback(found.reason)
        try:
            # Registered before the CPU backend starts, a bad handler (an FFI version mismatch)
            # would fail the backend's start instead of this call: start it first.
            jax.devices("cpu")
            handle = ctypes.CDLL(str(found.library))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(handle, TARGET)), platform="cpu")
        except Exception as e:  # any failure here means: use the zero fill
            return _fallback(f"could not register {found.library}: {e}")
        _loaded.append(handle)
        return found


def _fallback(reason: str) -> Native:
    log.warning("CPU loop buffers are zero-filled (skipped iterations cost a fill): %s", reason)
    return Native(False, reason)


def empty(shape, dtype, sharding=None):
    """An uninitialised array: our FFI allocation when lowered for the CPU, jax.lax.empty (GPU/TPU
    AllocateBuffer) elsewhere. The platform is the lowering's, not the host's: `python -m
    asura.aot` traces on a CPU host for a TPU."""
    shape = tuple(shape)
    default = functools.partial(compat.empty, shape, dtype, sharding)
    # A sharded buffer only arises under an explicit mesh (the TPU kernels' lowering); keep that to
    # jax.lax.empty, whose sharding rule the partitioner knows. On a GPU/TPU host nothing is built.
    if sharding is not None or jax.default_backend() != "cpu" or not native().available:
        return default()
    cpu = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, dtype))
    return jax.lax.platform_dependent(cpu=cpu, default=default)
