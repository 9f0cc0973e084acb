"""A full disk, as users meet it: train.py in a subprocess, progress bar and TensorBoard on, the
workdir on a small tmpfs (or under a file-size limit). Every case ends with one error line, no
traceback, the last good checkpoint intact and no half-written checkpoint left behind.

The tmpfs needs mount rights (root with CAP_SYS_ADMIN); where mounting is refused the tmpfs cases
skip and the file-size-limit case still runs.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, tiny_config

from asura.train.preflight import LOG_MARGIN, checkpoint_bytes

ARGS = [*TINY, "train.steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=6", "train.eval_every=6",
        "train.log_every=5", "train.async_checkpoint=true", "train.progress=true",
        "train.tensorboard=true"]  # fmt: skip
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes (unmounted after the test)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()[:120]}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def train(workdir: Path, *extra: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, preexec_fn=limit)


def lines(stderr: str) -> list[str]:
    """stderr lines with the progress bar's carriage-return redraws removed."""
    out = []
    for line in stderr.splitlines():
        last = line.split("\r")[-1].strip()
        if last and "it/s]" not in last and "s/it]" not in last and "?it/s" not in last:
            out.append(last)
    return out


def assert_one_error_line(p: subprocess.CompletedProcess, rc: int, *needles: str) -> None:
    """Exit rc; no traceback or orbax log; one error line, the last, holding one of the needles."""
    text = lines(p.stderr)
    assert p.returncode == rc, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "ERROR:absl" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in text if "error:" in ln]
    assert len(errors) == 1 and errors[0] == text[-1] and any(n in errors[0] for n in needles), text[-10:]


def committed_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_no_space_at_all_is_refused_before_any_file_is_written(tmpfs):
    fs = tmpfs(64 * 1024)
    fd = os.open(fs / "fill", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):  # to the last block: ENOSPC ends the loop
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    p = train(fs / "run")
    assert_one_error_line(p, 2, "bytes free on its filesystem")
    assert not (fs / "run").exists()


def _assert_last_step_kept(workdir: Path, step: int, why: str = "") -> None:
    from asura.train import integrity

    assert committed_steps(workdir)[-1] == step, why
    assert not [q for q in (workdir / "checkpoints").iterdir() if "tmp" in q.name]  # no half-written step
    assert integrity.verify(workdir / "checkpoints" / str(step)) is None


def test_just_enough_space_to_start_ends_in_one_line(tmpfs):
    cfg = tiny_config(*ARGS[len(TINY) :])
    # passes the start-up check (one checkpoint's arrays and the first logs), but not the six kept
    # checkpoints; which check meets the full disk first (a save's own free-space check, or a write
    # inside orbax) depends on block rounding, and both must end the same way
    fs = tmpfs(checkpoint_bytes(cfg) + LOG_MARGIN + 64 * 1024)
    p = train(fs / "run")
    assert_one_error_line(p, 4, "the state needs", "No space left on device")
    # and while it compiled, the bar said so (it used to sit at 0% with nothing said)
    assert "compiling the train step" in p.stderr
    steps = committed_steps(fs / "run")
    if steps:
        _assert_last_step_kept(fs / "run", steps[-1])
    assert not [q for q in (fs / "run" / "checkpoints").iterdir() if "tmp" in q.name]


def test_space_that_passes_the_save_check_fails_inside_the_save_in_one_line(tmpfs):
    """Free space above the state's bytes but below what orbax writes (metadata, block rounding): the
    write itself fails with ENOSPC, in orbax's writer threads."""
    cfg = tiny_config(*ARGS[len(TINY) :])
    fs = tmpfs(8 << 20)
    free = lambda: os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    before = free()
    first = train(fs / "run", "train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    used = (8 << 20) - free()
    step_bytes = before - free()  # what one checkpoint (and the first logs) took on this filesystem
    state, start = checkpoint_bytes(cfg), checkpoint_bytes(cfg) + LOG_MARGIN
    if step_bytes <= start:
        pytest.skip(f"a checkpoint takes {step_bytes} bytes here, no more than the {start} the checks ask for")
    # free space between what the checks ask (so they pass) and what the next checkpoint takes
    subprocess.run(["mount", "-o", f"remount,size={used + (start + step_bytes) // 2}", str(fs)], check=True)
    assert state < free() < step_bytes
    p = train(fs / "run", "train.steps=12", "--extend", "continue")
    assert_one_error_line(p, 4, "No space left on device", "(disk full); step 4 is kept")
    # Which write meets the full disk first depends on the order of orbax's writer threads and the log
    # writes: the step's array files (step 2 is the last one kept), or, after step 4 has committed,
    # its file checksums (step 4 stays, sealed; its seal verifies it on resume). On a busy machine the
    # log and event writes between saves can take the last bytes after step 4 committed; then the
    # next save's free-space check refuses it ("0 bytes free ... (disk full); step 4 is kept").
    # Every order keeps a good step.
    last = 4 if re.search(r"writing the checksums of|step 4 is kept", lines(p.stderr)[-1]) else 2
    _assert_last_step_kept(fs / "run", last, p.stderr[-2000:])


def test_a_file_size_limit_fails_the_checkpoint_in_one_line(tmp_path):
    cfg = tiny_config(*ARGS[len(TINY) :])
    # files up to a tenth of the state: config, logs and events fit, a checkpoint's array files do not
    p = train(tmp_path / "run", limit_bytes=checkpoint_bytes(cfg) // 10)
    assert_one_error_line(p, 4, "File too large")
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no half-written step
