"""Uninitialised buffers on the CPU too: ``empty`` allocates without a fill on every backend.

``jax.lax.empty`` is AllocateBuffer on GPU/TPU and a zero fill on the CPU. The while driver's
buffers have S = max_iterations rows however many steps run, so on the CPU a program compiled for
S = 16 and run at depth 2 spent most of its extra time writing zeros into rows nobody reads
(issue #18: remat none 1.62x the S = 2 step, block 1.16x). Here the CPU gets its own allocation: a
small FFI handler (``uninitialised.c``) that leaves the output as XLA allocated it.

The handler is compiled on first use with the system C compiler (``$CC``, else ``cc``) against the
installed jaxlib's FFI header, and cached per (source, header, machine, compiler) under
``$XDG_CACHE_HOME/asura/native`` (``~/.cache/asura/native``), else a private per-user temp dir.
``empty`` falls back to ``jax.lax.empty`` (zeros on the CPU: slower when iterations are skipped,
never wrong) where the handler cannot be built or registered (logged once, with the reason), with
``ASURA_UNINITIALISED=0``, in a process with several CPU devices (the partitioner would allocate
the custom call at its global shape on each device, then slice it), and under ``jax_debug_nans`` /
``jax_debug_infs`` (uninitialised memory may hold NaN bit patterns, which those checks would
report). A program lowered with it cannot be serialised by ``jax.export`` for the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shlex
import stat
import subprocess
import sys
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


class UnsafeDirectory(OSError):
    """A cache directory or library this user does not own, or that others may write."""


def cache_dirs() -> list[Path]:
    """Where the library is built and looked for: the user cache, then a per-user temp dir."""
    dirs = []
    with contextlib.suppress(RuntimeError):  # no home directory to be found
        dirs.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asura" / "native")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [*dirs, Path(tempfile.gettempdir()) / f"asura-native-{uid}"]


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _header() -> Path:
    return Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"


def _check_private(path: Path) -> None:
    """Load code only from what this user owns and nobody else can write: the temp dir is shared,
    and a library planted there would run in this process."""
    if not hasattr(os, "getuid"):
        return
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(f"{path} is not private to this user (owner {st.st_uid}, mode {oct(st.st_mode)})")


def library(directory: Path) -> Path:
    """The library's path in `directory`: one per source, FFI header, machine and compiler."""
    facts = [SOURCE.read_bytes(), _header().read_bytes(), platform.machine().encode(), sys.platform.encode(),
             " ".join(_compiler()).encode()]  # fmt: skip
    return directory / f"uninitialised-{hashlib.sha256(b'\0'.join(facts)).hexdigest()[:16]}.so"


def build(directory: Path, rebuild: bool = False) -> Path:
    """Compile the handler into `directory` unless it is there, and return the library. Raises
    OSError (UnsafeDirectory for a directory or file others could write), or
    subprocess.CalledProcessError / TimeoutExpired with the compiler's message."""
    lib = library(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(directory)
    if lib.exists() and not rebuild:
        _check_private(lib)
        return lib
    # Compile to a private name, then rename: parallel test workers may build at the same time.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [*_compiler(), "-O2", "-shared", "-fPIC", "-std=c11", f"-I{jax.ffi.include_dir()}", str(SOURCE),
               "-o", tmp]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


def locate(directories, rebuild: bool = False) -> Native:
    """The compiled handler from the first usable directory. Only directory problems move on to the
    next one; a compiler that fails or hangs fails once."""
    errors = []
    for directory in directories:
        try:
            lib = build(Path(directory), rebuild)
            return Native(True, str(lib), lib)
        except subprocess.CalledProcessError as e:
            last = (e.stderr or "").strip().splitlines()
            errors.append(f"{e.cmd[0]} exited {e.returncode}: {last[-1] if last else ''}")
            break
        except subprocess.TimeoutExpired as e:
            errors.append(f"{e.cmd[0]} timed out after {e.timeout:.0f} s")
            break
        except OSError as e:
            errors.append(f"{directory}: {e}")
    return Native(False, "could not compile uninitialised.c: " + "; ".join(errors))


def _open(lib: Path) -> ctypes.CDLL:
    """Load the library; one that does not load (truncated, another machine's build) is rebuilt once."""
    try:
        return ctypes.CDLL(str(lib))
    except OSError:
        rebuilt = locate([lib.parent], rebuild=True)
        if not rebuilt.available:
            raise OSError(rebuilt.reason) from None
        return ctypes.CDLL(str(rebuilt.library))


_lock = threading.Lock()
_loaded: list[ctypes.CDLL] = []  # keeps the registered library mapped for the process


@functools.cache
def native() -> Native:
    """Build, load and register the CPU handler once per process; never raises."""
    if os.environ.get(ENV, "1") == "0":
        return Native(False, f"{ENV}=0")
    with _lock:
        found = locate(cache_dirs())
        if found.available:
            try:
                handle = _open(found.library)
                # Registered before the CPU backend starts, a bad handler (an FFI version mismatch)
                # would fail the backend's start instead of this call: start it first.
                jax.devices("cpu")
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(handle, TARGET)), platform="cpu")
            except Exception as e:  # any failure here means: use the zero fill
                found = Native(False, f"could not load or register {found.library}: {e}")
            else:
                _loaded.append(handle)
                return found
        log.warning("CPU loop buffers are zero-filled (skipped iterations cost a fill): %s", found.reason)
        return found


def _use_native() -> bool:
    if jax.default_backend() != "cpu" or len(jax.devices("cpu")) > 1:
        return False  # nothing to build on a GPU/TPU host; see the module docstring for several devices
    if jax.config.jax_debug_nans or jax.config.jax_debug_infs:
        return False
    return native().available


def empty(shape, dtype, sharding=None):
    """An uninitialised array: our FFI allocation when lowered for the CPU, jax.lax.empty (GPU/TPU
    AllocateBuffer) elsewhere. The platform is the lowering's, not the host's: `python -m
    asura.aot` traces on a CPU host for a TPU."""
    shape = tuple(shape)
    default = functools.partial(compat.empty, shape, dtype, sharding)
    # A sharded buffer only arises under an explicit mesh (the TPU kernels' lowering); keep that to
    # jax.lax.empty, whose sharding rule the partitioner knows.
    if sharding is not None or not _use_native():
        return default()
    cpu = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, dtype))
    return jax.lax.platform_dependent(cpu=cpu, default=default)
