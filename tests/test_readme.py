"""Every command README.md shows runs as written, in a fresh copy of the repository, after the quickstart.

The copy holds the repository's files (tracked, and untracked ones git does not ignore) and this
checkout's `.venv` (linked; `make demo` then finds it set up and trains). Commands run in README
order, as written, with `bash -c`, because later ones read what earlier ones wrote (runs/demo,
data/pydoc, runs/sweep). Each command has an entry in CHECKS saying what running it must show; a
README command without an entry fails the test, so a new command cannot go untested. Commands that
do not end by themselves (a server) run until they show that they work, and are then stopped.
`$ command` lines in ```text blocks (the FLOP tables) are run too, and their output must equal the
README's text.

Slow (about 10 minutes on 2 cores): `make test-all` runs it, and so does CI (.ci/run), after the
suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

README = ROOT / "README.md"


@dataclass(frozen=True)
class Check:
    expect: tuple[str, ...] = ()  # substrings of stdout + stderr
    timeout: float = 600.0
    until: str | None = None  # a long-running command: stop it once this appears (stdout, stderr or `log`)
    log: str | None = None  # a file (relative to the copy) where `until` appears instead
    verify: Callable[[Path], None] | None = None  # more checks on the copy afterwards
    env: dict = field(default_factory=dict)


def _json_depths(path: str, want: int):
    def verify(copy: Path) -> None:
        out = json.loads((copy / path).read_text())
        assert len(out["depths"]) == want and out["data"]["difficulty"] == 3, out

    return verify


def _tensorboard_lists_runs(copy: Path) -> None:
    runs: list = []
    for _ in range(30):  # it loads the event files in the background after it starts serving
        with urllib.request.urlopen("http://localhost:6006/data/runs", timeout=10) as r:
            runs = json.loads(r.read())
        if any(run.startswith("demo") for run in runs):
            return
        time.sleep(1)
    raise AssertionError(f"TensorBoard lists no demo run: {runs}")


def _finished(workdir: str, step: int):
    def verify(copy: Path) -> None:
        steps = [json.loads(line)["step"] for line in (copy / workdir / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == step

    return verify


def _halting_rebuilt(copy: Path) -> None:
    """The halting study in a copy: nothing retrained or re-evaluated, EXITS.md rebuilt from the
    committed records and exit results equal to the committed one (the commands line aside)."""
    study = copy / "results" / "halting" / "protocol"
    assert not (study / "trials").exists()
    new, old = ((b / "results/halting/protocol/EXITS.md").read_text() for b in (copy, ROOT))
    assert new[new.index("## Pre-registered") :] == old[old.index("## Pre-registered") :]


def _retrained_nothing(copy: Path) -> None:
    """The study plan in a copy: no trial workdir made, and the reports' results rebuilt from the
    committed records equal the committed ones."""
    out = copy / "results" / "protocol"
    assert not [d.name for d in out.iterdir() if (d / "trials").exists()]
    for name in ("demo_iso_baselines", "hard_iso_baselines", "text_iso_baselines", "demo_ablation"):
        new, old = ((base / "results" / "protocol" / name / "REPORT.md").read_text() for base in (copy, ROOT))
        results = [t[t.index("## Results") : t.index("## Plots")] for t in (new, old)]
        assert results[0] == results[1], name
    new, old = ((b / "results/protocol/demo_extrapolation/EXTRAPOLATION.md").read_text() for b in (copy, ROOT))
    assert new[new.index("## exact_match") :] == old[old.index("## exact_match") :]  # from the committed results


def readme_python(text: str, after: str) -> str:
    """The first ```python block after the heading `after`."""
    section = text[text.index(after) :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _export_loads(copy: Path) -> None:
    """The export's files, and (with the hf extra) the README's transformers snippet run as written: its
    greedy completions at depths 1, 3, 6 are those `python -m asura.generate` prints."""
    config = json.loads((copy / "exports/demo/config.json").read_text())
    assert config["asura_step"] == 600 and (copy / "exports/demo/modeling_asura.py").is_file(), config
    py = str(copy / ".venv/bin/python")
    if subprocess.run([py, "-c", "import torch, transformers"], capture_output=True).returncode != 0:
        return  # without the hf extra only the files are checked (CI installs it)
    snippet = readme_python(README.read_text(), "## Sharing a trained model")
    p = subprocess.run([py, "-c", snippet], cwd=copy, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    for depth, line in zip((1, 3, 6), p.stdout.splitlines(), strict=True):
        ours = subprocess.run([py, "-m", "asura.generate", "--workdir", "runs/demo", "--depth", str(depth), "--prompt",
                               "12+34=", "--max-new-tokens", "4", "--extrapolation", "last"], cwd=copy,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert line == f"{depth} {ours.stdout[:-1]!r}", (line, ours.stdout, ours.stderr[-500:])


CHECKS: dict[str, Check] = {
    "make demo": Check(expect=("done at step 600", "exact_match"), verify=_finished("runs/demo", 600)),
    "make test": Check(),  # the suite itself: CI runs it directly, before this test
    ".venv/bin/python -m asura.evaluate --workdir runs/demo --depths 1-8 --extrapolation last": Check(
        expect=("depth", "em", "(extrapolated)")
    ),
    ".venv/bin/python -m asura.evaluate --workdir runs/demo --task-difficulty 3 "
    "--json runs/demo/eval_3digit.json": Check(verify=_json_depths("runs/demo/eval_3digit.json", 4)),
    ".venv/bin/python -m asura.evaluate --workdir runs/demo --exit steps:2 --exit latent:0.1,0.3 "
    "--exit kl:1e-3,0.1": Check(expect=("per-token halting to depth 3 (kv=copy)", "vs fixed")),
    '.venv/bin/python -m asura.generate --workdir runs/demo --depth 3 --question "12+34"': Check(
        expect=("prompt '12+34=' from --question",)
    ),
    '.venv/bin/python -m asura.generate --workdir runs/demo --depth 3 --prompt "12+34=" --max-new-tokens 4': Check(
        expect=("4 tokens",)
    ),
    ".venv/bin/python -m asura.export --workdir runs/demo --out exports/demo": Check(
        expect=("exports/demo: AsuraForCausalLM from step 600",), verify=_export_loads
    ),
    ".venv/bin/python train.py --workdir runs/demo train.steps=900 --extend continue": Check(
        expect=("extending train.steps 600 -> 900", "done at step 900"), verify=_finished("runs/demo", 900)
    ),
    ".venv/bin/python train.py --config configs/demo.yaml --workdir runs/abba model.adapter=abba "
    "depth.schedule=uniform": Check(expect=("done at step 600",)),
    ".venv/bin/python -m asura.flops --config configs/presets/looped_350m.yaml": Check(expect=("iso_flop_width",)),
    "PYTHONPATH=examples .venv/bin/python train.py --workdir runs/sort data.task=my_task:SortDigits "
    "data.difficulty=4 train.steps=300": Check(
        expect=("done at step 300", "exact_match"), verify=_finished("runs/sort", 300)
    ),
    ".venv/bin/python -m asura.data.prepare --builtin pydoc --output data/pydoc": Check(),
    ".venv/bin/python train.py --config configs/pydoc.yaml": Check(
        expect=("done at step 600", "bits_per_byte"), verify=_finished("runs/pydoc", 600)
    ),
    ".venv/bin/python -m asura.sweep configs/sweeps/tiny_cpu.yaml --workdir runs/sweep --workers 2": Check(
        expect=("summary: runs/sweep/summary.md",), timeout=900
    ),
    ".venv/bin/python -m asura.sweep report runs/sweep --metric exact_match": Check(expect=("runs/sweep/REPORT",)),
    ".venv/bin/python -m asura.sweep extrapolate runs/sweep --factor 4": Check(expect=("EXTRAPOLATION.md",)),
    ".venv/bin/python -m asura.sweep exits runs/sweep --exit latent:0.1,0.3 --exit kl:0.01": Check(
        expect=("EXITS.md",)
    ),
    ".venv/bin/jupyter execute notebooks/ablations.ipynb": Check(),
    "ASURA_NB_WORKDIR=runs/demo .venv/bin/jupyter execute notebooks/loop_depth.ipynb": Check(),
    ".venv/bin/tensorboard --logdir runs": Check(until="http://localhost:6006", verify=_tensorboard_lists_runs),
    ".venv/bin/python -m asura.sweep study configs/studies/cpu_protocol.yaml --dry-run": Check(
        expect=("demo_iso_baselines: 48 trials + 36 lr-tuning trials",)
    ),
    # In a clone every record is committed: nothing retrains (a trial would print "started"), every
    # report is rebuilt from the records.
    ".venv/bin/python -m asura.sweep study configs/studies/cpu_protocol.yaml": Check(
        expect=("48 trials, 48 done, 0 to run", "index:"), timeout=600, verify=_retrained_nothing
    ),
    ".venv/bin/python -m asura.sweep study configs/studies/halting_cpu.yaml": Check(
        expect=("24 trials, 24 done, 0 to run", "index:"), timeout=600, verify=_halting_rebuilt
    ),
    ".venv/bin/python -m asura.aot --config configs/demo.yaml --topology v5e:2x2 model.attention=pallas": Check(
        expect=("peak",)
    ),
    ".venv/bin/python -m asura.aot --config configs/demo.yaml --topology v5e:2x2 --slices 2 mesh.dcn.data=2": Check(
        expect=("on 2 x v5e:2x2: 8 x TPU v5 lite", "DCN (across slices)", "ALL_REDUCE", "DCN     >= ")
    ),
}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, in order (a trailing `# comment` dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def readme_transcripts(text: str) -> list[tuple[str, str]]:
    """(command, expected output) of every `$ command` in a ```text block."""
    out = []
    for block in re.findall(r"```text\n(.*?)```", text, re.S):
        for part in re.split(r"^\$ ", block, flags=re.M)[1:]:
            cmd, _, expected = part.partition("\n")
            out.append((cmd.strip(), expected.strip()))
    return out


def fresh_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def _setup_is_done() -> None:
    """`make demo` runs scripts/setup.sh: with the linked .venv it must find its stamp, or it would
    reinstall asura from the temporary copy into this checkout's environment."""
    extras = "research,notebooks,dev" + (f",{os.environ['ASURA_EXTRAS']}" if os.environ.get("ASURA_EXTRAS") else "")
    digest = hashlib.sha1((README.parent / "pyproject.toml").read_bytes() + (extras + "\n").encode()).hexdigest()
    if not (ROOT / ".venv" / f".installed-{digest[:12]}").exists():
        pytest.fail(f"run `ASURA_EXTRAS={os.environ.get('ASURA_EXTRAS', '')} make setup` first: .venv is not set up "
                    f"for extras {extras}")  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_command(copy: Path, cmd: str, check: Check) -> list[str]:
    """Problems found running one README command (empty when it did what the README says)."""
    env = {**os.environ, **check.env}
    env.pop("PYTHONPATH", None)  # as a user's shell: the copy's code, found from its own directory
    t0 = time.time()
    if check.until is None:
        try:
            p = subprocess.run(["bash", "-c", cmd], cwd=copy, env=env, capture_output=True, text=True,
                               timeout=check.timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return [f"did not finish in {check.timeout:.0f}s"]
        output = p.stdout + p.stderr
        problems = [] if p.returncode == 0 else [f"exit {p.returncode}: {output[-1500:]}"]
    else:  # runs until it shows it works, then stopped (its whole process group)
        background = cmd.endswith("&")
        out_file = copy.parent / f"out-{time.time_ns()}.txt"
        with out_file.open("w") as sink:
            proc = subprocess.Popen(["bash", "-c", cmd + (" wait" if background else "")], cwd=copy, env=env,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        output, problems = "", [f"never showed {check.until!r} in {check.timeout:.0f}s"]
        while time.time() - t0 < check.timeout:
            output = out_file.read_text(errors="replace")
            seen = (copy / check.log).read_text() if check.log and (copy / check.log).exists() else output
            if check.until in seen:
                problems = []
                break
            if proc.poll() is not None and not background:
                problems = [f"ended (exit {proc.returncode}) before showing {check.until!r}: {output[-1500:]}"]
                break
            time.sleep(1)
        if not problems and check.verify is not None:
            try:
                check.verify(copy)
            except AssertionError as e:
                problems.append(f"check failed: {e}")
        _stop(proc)
        return [f"{p} ({time.time() - t0:.0f}s)" for p in problems]
    missing = [e for e in check.expect if e not in output]
    if missing:
        problems.append(f"output lacks {missing}: {output[-1500:]}")
    if not problems and check.verify is not None:
        try:
            check.verify(copy)
        except AssertionError as e:
            problems.append(f"check failed: {e}")
    return problems


def test_every_readme_command_has_a_check():
    commands = readme_commands(README.read_text())
    assert commands, "no ```bash blocks found in README.md"
    unchecked = [c for c in commands if c not in CHECKS]
    stale = [c for c in CHECKS if c not in commands]
    assert not unchecked, f"README commands without a check in tests/test_readme.py: {unchecked}"
    assert not stale, f"checks for commands the README no longer shows: {stale}"


def test_every_readme_command_runs_as_written(tmp_path):
    _setup_is_done()
    copy = fresh_copy(tmp_path / "asura")
    failures = {}
    for cmd in readme_commands(README.read_text()):
        if cmd == "make test":
            continue  # CI runs the suite directly; running it from inside itself would recurse
        t0 = time.time()
        problems = run_command(copy, cmd, CHECKS[cmd])
        print(f"[readme] {time.time() - t0:6.1f}s  {'FAIL' if problems else 'ok  '}  {cmd}", flush=True)
        if problems:
            failures[cmd] = problems
    for cmd, expected in readme_transcripts(README.read_text()):
        venv_cmd = re.sub(r"^python ", ".venv/bin/python ", cmd)
        p = subprocess.run(["bash", "-c", venv_cmd], cwd=copy, capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or p.stdout.strip() != expected:
            failures[f"$ {cmd}"] = [f"output differs from README:\n{p.stdout}\n{p.stderr[-1000:]}"]
    assert not failures, "\n".join(f"{c}:\n  " + "\n  ".join(p) for c, p in failures.items())
