"""The workdir around a run: one exclusive lock, an atomic config.yaml, early signal handlers.

Preemptible pods kill, fill disks and start two jobs on one path; nothing here may leave
the workdir in a state a rerun cannot use. A workdir is a local directory or a gs:// prefix
(asura.storage.paths.to_path):

* `workdir_lock`: locally `WorkdirLock`, an flock on ``workdir/.lock`` holding ``host pid
  start-time``. The kernel drops an flock when its process dies, so a lock left by a killed run
  is never "stale" in practice; where flock is not supported (some network filesystems) a lock
  whose pid is gone on this host is taken over. On gs:// `asura.storage.lock.ObjectLock`: an
  object created only if absent, with a heartbeat and stale-lock takeover. With several
  processes only process 0 takes it (it speaks for the job).
* `write_config`: written whole (temp + rename; one upload on gs://), so a kill mid-write never
  leaves config.yaml empty.
* `Signals`: SIGTERM/SIGINT handlers installed before anything slow (imports, compile);
  a signal before the first step ends the run cleanly with exit 0.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from asura.storage.lock import pid_alive
from asura.storage.paths import StorageError, is_remote, write_whole


class WorkdirError(ValueError):
    """A workdir that cannot be used (busy, not a directory, not writable); one line."""


def check_writable(workdir) -> None:
    """Fail fast (before compiling) when the workdir cannot hold a run. On gs:// the bucket must
    exist and be listable here; writing is proven by the lock, the first write, before compiling."""
    if is_remote(workdir):
        from asura.storage import gcs

        try:
            gcs.check_readable(workdir)
        except StorageError as e:
            raise WorkdirError(f"workdir {e}") from None
        return
    workdir = Path(os.fspath(workdir))
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is a file, not a directory; pass --workdir DIR")
    probe = workdir if workdir.exists() else next((p for p in workdir.parents if p.exists()), Path("/"))
    if not probe.is_dir():
        raise WorkdirError(f"workdir {workdir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "workdir" if probe == workdir else f"workdir's parent {probe}"
        raise WorkdirError(f"workdir {workdir}: {what} is not writable (permission denied or read-only)")
    ckpt = workdir / "checkpoints"
    if ckpt.is_dir() and not os.access(ckpt, os.W_OK | os.X_OK):
        raise WorkdirError(f"checkpoint dir {ckpt} is not writable (permission denied or read-only)")


def make_workdir(workdir) -> None:
    if is_remote(workdir):
        return  # a prefix exists once an object under it does
    try:
        Path(os.fspath(workdir)).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. under /proc, or a parent root cannot write
        raise WorkdirError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None


class WorkdirLock:
    """Exclusive lock on a local workdir for the life of one trainer (a context manager)."""

    lost: str | None = None  # an flock cannot be taken away (the object lock's can)

    def confirm(self) -> str | None:
        return None

    def __init__(self, workdir):
        self.path = Path(os.fspath(workdir)) / ".lock"
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def check_free(self) -> None:
        """Refuse now (WorkdirError) if another trainer holds the lock, touching nothing: the checks
        that come before `acquire` must not rewrite the lock file of a workdir they then refuse."""
        if not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # unreadable: `acquire` reports it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise WorkdirError(
                f"workdir {self.path.parent} is in use by another trainer ({self._holder()}); "
                "wait for it, stop it, or use another --workdir"
            ) from None
        except OSError:
            pass  # no flock here: `acquire` falls back to the holder's pid
        finally:
            os.close(fd)

    def acquire(self) -> WorkdirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"workdir {self.path.parent}: cannot create its lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.path.parent} is in use by another trainer ({self._holder()}); "
                "wait for it, stop it, or use another --workdir"
            ) from None
        except OSError as e:  # no flock on this filesystem: fall back to the pid in the file
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            host, pid = [*self._holder().split(), "", "0"][:2]
            if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                os.close(fd)
                raise WorkdirError(f"workdir {self.path.parent} is in use by pid {pid} on {host}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        except OSError as e:  # the holder line is informational; a full disk is still worth one clear line
            os.close(fd)
            raise WorkdirError(f"workdir {self.path.parent}: cannot write its lock file ({e.strerror or e})") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (its content is informational)
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def close(self) -> None:
        self.release()


class _NoLock:
    """Processes other than 0 of a multi-process job: process 0 holds the lock for the job."""

    lost: str | None = None

    def confirm(self) -> str | None:
        return None

    def check_free(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass


def agreed(fn, workdir) -> None:
    """Run `fn()` (a check that may raise WorkdirError) on process 0 and make every process of a
    multi-process job raise with it: the others would otherwise wait for process 0 at their next
    collective forever."""
    import jax

    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirError(f"workdir {workdir}: refused on process 0 (its error names why)")
    if error is not None:
        raise error


def workdir_lock(workdir, process_index: int = 0):
    """The lock for this workdir: an flock locally, an object with a heartbeat on gs://."""
    if process_index != 0:
        return _NoLock()
    if is_remote(workdir):
        from asura.storage.lock import ObjectLock

        return _Refusing(ObjectLock(workdir))
    return WorkdirLock(workdir)


class _Refusing:
    """An ObjectLock whose refusals and storage failures are WorkdirErrors (train.py: exit 2)."""

    def __init__(self, lock):
        self.lock = lock

    @property
    def lost(self) -> str | None:
        return self.lock.lost

    def confirm(self) -> str | None:
        return self.lock.confirm()

    @property
    def took_over(self) -> str | None:
        return self.lock.took_over

    def check_free(self) -> None:
        try:
            self.lock.check_free()
        except StorageError as e:
            raise WorkdirError(str(e)) from None

    def __enter__(self):
        try:
            self.lock.acquire()
        except StorageError as e:
            raise WorkdirError(str(e)) from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def close(self) -> None:
        self.lock.release()


def write_config(workdir, text: str) -> None:
    """config.yaml written whole (temp + rename; one upload on gs://): never empty or torn."""
    from asura.storage.paths import to_path

    write_whole(to_path(workdir) / "config.yaml", text)


class Signals:
    """SIGTERM/SIGINT set a flag that the loop reads at step boundaries (the process-wide instance).

    `install()` is idempotent: train.py calls it first thing, so a signal during imports or
    compilation is caught too; `run` calls it again and restores the previous handlers at the end.
    """

    received: int | None = None
    _old: dict[int, Any] = {}  # noqa: RUF012 - process-wide by design

    @classmethod
    def install(cls) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig not in cls._old:
                cls._old[sig] = signal.signal(sig, cls._handle)
        return True

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.received = signum

    @classmethod
    def restore(cls) -> None:
        for sig, handler in cls._old.items():
            signal.signal(sig, handler)
        cls._old = {}
        cls.received = None
