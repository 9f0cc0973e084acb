"""The workdir lock on gs://: an object created only if absent, kept alive by a heartbeat.

A local workdir uses an flock (asura.train.workdir.WorkdirLock): the kernel drops it when its
process dies. An object store has no such thing, so the lock is the object `<workdir>/.lock`:

* acquire: create it only if absent (`ifGenerationMatch=0`): of two trainers exactly one wins;
* the holder rewrites it every HEARTBEAT_S seconds, each time only if it is still the generation
  the holder last wrote (compare-and-swap); a rewrite that fails means another trainer took the
  lock over, and the holder stops without saving over it; the trainer also confirms the lock
  (`confirm`: the same compare-and-swap, now) before every log, eval and checkpoint, so a
  takeover between heartbeats never gets a write in;
* a lock whose last write (the server's update time) is older than STALE_S belongs to a trainer
  that died or was preempted without releasing it, and so does one written by a process of this
  host that no longer exists (a run killed and restarted on the same machine need not wait): the
  next trainer takes it over with the same compare-and-swap (of two trainers taking over, one wins);
* release deletes it, only if it is still ours.

The object holds JSON: host, pid, start time, a random token; it is informational, the generation
number is what decides.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from asura.storage import gcs
from asura.storage.paths import StorageError

HEARTBEAT_S = 15.0  # a thread rewrites the lock this often
STALE_S = 120.0  # a lock not rewritten for this long is taken over (a preempted or killed trainer)
# `confirm` skips the write when the lock was written less than this long ago: a takeover needs
# STALE_S without a write, so such a lock is still ours; and GCS allows about one write per second
# to one object.
CONFIRM_S = 1.0


def pid_alive(pid: int) -> bool:
    """Does a process with this pid exist on this host (one we may not signal counts)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockBusy(StorageError):
    """The workdir is held by a live trainer; one line."""


class ObjectLock:
    def __init__(self, workdir, *, heartbeat_s: float | None = None, stale_s: float | None = None):
        self.path = f"{os.fspath(workdir)}/.lock"
        self.workdir = os.fspath(workdir)
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.generation: int | None = None
        self.lost: str | None = None  # set by the heartbeat when another trainer took the lock over
        self.took_over: str | None = None  # the stale holder we replaced, for the log
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # the heartbeat and `confirm` must not race each other's generation
        self._written = 0.0  # time.monotonic() of our last successful write
        self._thread: threading.Thread | None = None
        self._body = b""

    def _describe(self, data: bytes, age: float) -> str:
        try:
            h = json.loads(data)
            who = f"{h.get('host')} pid {h.get('pid')}, started {h.get('started')}"
        except (ValueError, AttributeError):
            who = "unknown holder"
        return f"{who}; last heartbeat {age:.0f}s ago"

    def _busy(self, held: gcs.Object) -> LockBusy:
        who = self._describe(held.data, time.time() - held.updated)
        return LockBusy(
            f"workdir {self.workdir} is in use by another trainer ({who}); wait for it, stop it, or use another "
            f"--workdir (a lock not renewed for {self.stale_s:.0f}s is taken over)"
        )

    def _live(self, held: gcs.Object) -> bool:
        """Is the holder alive, as far as we can tell? Not when its heartbeat is stale, nor when it
        was a process of this host that is gone."""
        if time.time() - held.updated >= self.stale_s:
            return False
        try:
            h = json.loads(held.data)
            here, pid = h.get("host") == socket.gethostname(), int(h.get("pid", 0))
        except (ValueError, AttributeError, TypeError):
            return True
        return not here or pid == os.getpid() or pid_alive(pid)

    def check_free(self) -> None:
        """LockBusy now if a live trainer holds it; touches nothing."""
        held = gcs.read(self.path)
        if held is not None and self._live(held):
            raise self._busy(held)

    def acquire(self) -> ObjectLock:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._body = json.dumps({**holder, "token": uuid.uuid4().hex}).encode()
        for _ in range(3):  # a lock released or taken between our requests: look again
            gen = gcs.create_if_absent(self.path, self._body)
            if gen is not None:
                break
            held = gcs.read(self.path)
            if held is None:
                continue
            if self._live(held):
                raise self._busy(held)
            gen = gcs.replace_if(self.path, self._body, held.generation)
            if gen is not None:
                self.took_over = self._describe(held.data, time.time() - held.updated)
                break
        else:
            raise LockBusy(f"workdir {self.workdir}: its lock changed hands three times while taking it; try again")
        self.generation, self._written = gen, time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="asura-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self._heartbeat_once():
            pass

    def confirm(self) -> str | None:
        """Rewrite the lock now (a heartbeat); None while it is ours, else why it is lost."""
        if self.lost is None and self.generation is not None and time.monotonic() - self._written >= CONFIRM_S:
            self._heartbeat_once()
        return self.lost

    def _heartbeat_once(self) -> bool:
        """Rewrite the lock if it is still ours; False (and `lost` set) once another trainer has it."""
        with self._mutex:
            if self.lost is not None:
                return False
            return self._beat()

    def _beat(self) -> bool:
        try:
            gen = gcs.replace_if(self.path, self._body, self.generation)
        except StorageError:  # transient (network): the next beat tries again; stale only after stale_s
            return True
        if gen is None:
            try:
                held = gcs.read(self.path)
                who = self._describe(held.data, time.time() - held.updated) if held else "the lock was deleted"
            except StorageError as e:
                who = str(e)
            self.lost = f"lost the lock on workdir {self.workdir} to another trainer ({who})"
            return False
        self.generation, self._written = gen, time.monotonic()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None and self.lost is None:
            gcs.delete_if(self.path, self.generation)
        self.generation = None

    def __enter__(self) -> ObjectLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
