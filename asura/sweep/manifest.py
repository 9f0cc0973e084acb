"""Per-trial manifest (DIR/trials/<id>/manifest.json): everything a fair comparison needs.

Resolved config, unique params and FLOPs/token from the accountant, tokens seen, the depth
distribution and bptt_k, metrics at every evaluated depth (the learning curve), wall time and
status, the overrides given outside the spec file (study preset, command line), the git commit
(and whether the tree was dirty) and the environment (package versions, CPU, threads, XLA flags,
device kind).

Each manifest is also written as the cell's *record*, DIR/records/<cell>.json (the latest attempt
of each grid cell): small, committed with the study, and all that reports read (``read_all``), so a
report regenerates from the repo alone and a study resumed elsewhere skips the cells whose
complete record matches their config (``done_cells``). The trial workdirs (checkpoints) and the
optuna database stay local.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from asura.config.load import config_to_dict
from asura.config.schema import Config
from asura.flops import summary
from asura.sweep.grid import config_hash

MANIFEST = "manifest.json"
RECORDS = "records"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "grain")
REPO_ROOT = Path(__file__).resolve().parents[2]


def shown_path(path: str | Path) -> Path:
    """A path as reports and commands show it: relative to the repository root when inside it, so a
    report regenerated from the committed records in another clone reads the same."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else Path(path)


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of ``repo`` (+ " (uncommitted changes)" when tracked files outside results/
    differ), else "unknown"."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            # results/ holds committed reports that every study rewrites: not a code change
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return "unknown"
    sha = head.stdout.strip() or "unknown"
    return f"{sha} (uncommitted changes)" if dirty.returncode == 0 and dirty.stdout.strip() else sha


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a number may depend on besides the code: XLA:CPU results differ across CPUs and flags."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import jax

    dev = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "packages": versions,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "device_kind": dev.device_kind,
        "backend": dev.platform,
        "device_count": jax.device_count(),
    }


def accounting(cfg: Config, steps_done: int | None = None) -> dict:
    s = summary(cfg)
    steps = cfg.train.steps if steps_done is None else steps_done
    tokens_seen = steps * cfg.train.batch_size * cfg.data.seq_len
    return {
        "params_unique": s["params_unique"],
        "params_trained": s["params_trained"],
        "params_total": s["params_total"],
        "flops_per_token_fwd": s["flops_per_token_fwd"],
        "flops_per_token_train": s["flops_per_token_train"],
        "train_tokens": s["train_tokens"],  # planned: steps × batch × seq_len
        "train_flops": s["train_flops"],  # planned total; what iso-FLOP labels compare
        "tokens_seen": tokens_seen,
        "flops_seen": s["flops_per_token_train"] * tokens_seen,
        "expected_depth": s["expected_depth"],
        "depth_pmf": s["depth_pmf"],
        "bptt_k": cfg.depth.bptt_k,
    }


def build(
    *,
    trial: int,
    cell: dict,
    cfg: Config,
    status: str,
    metric: str,
    value: float | None,
    evals: list,
    final: dict | None,
    steps_done: int | None,
    wall_s: float,
    error: str | None = None,
    extra_overrides: dict | None = None,
    train: list | None = None,
) -> dict:
    return {
        "trial": trial,
        **cell,  # key, group, seed, role, parent, overrides, aliases
        "extra_overrides": extra_overrides or {},  # outside the spec file (study preset, command line), every trial
        "status": status,  # complete | pruned | failed | interrupted
        "error": error,
        "metric": metric,
        "value": value,
        "final": {str(d): m for d, m in (final or {}).items()},
        "evals": [{"step": s, "depths": {str(d): m for d, m in ds.items()}} for s, ds in evals],
        "train": train or [],  # train_curve: the training ce beside each eval
        "wall_s": round(wall_s, 3),
        **accounting(cfg, steps_done),
        "config": config_to_dict(cfg),
        "config_hash": config_hash(cfg),
        "commit": git_commit(),
        "environment": environment(),
    }


def train_curve(workdir: Path, eval_steps: list[int]) -> list[dict]:
    """The training side of the learning curve: at each eval step, the mean logged ``train/ce``
    over the steps after the previous eval up to it (``n`` logged steps), from the trial's
    metrics.jsonl (truncated to the checkpoint on resume, so each step counts once); [] without
    one. Beside the eval ce it shows the generalisation gap."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    ce: dict[int, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("train/ce"), int | float):
            ce[int(rec["step"])] = float(rec["train/ce"])
    out, prev = [], 0
    for s in eval_steps:
        window = [v for k, v in ce.items() if prev < k <= s]
        if window:
            out.append({"step": int(s), "ce": sum(window) / len(window), "n": len(window)})
        prev = s
    return out


def trial_dir(sweep_dir: Path, trial: int) -> Path:
    """A trial's workdir (checkpoints, metrics.jsonl): local only, never committed."""
    return Path(sweep_dir) / "trials" / f"{int(trial):04d}"


def cell_result_path(sweep_dir: Path, name: str, key: str) -> Path:
    """DIR/<name>/<cell key as a file name>.json: the record's file name, in the results' own dir."""
    return Path(sweep_dir) / name / record_path(sweep_dir, key).name


def cell_results(sweep_dir: Path, name: str, cell: dict, keys: list[str], evaluate) -> dict[str, dict]:
    """Results computed from a cell's checkpoint, kept per cell in DIR/<name>/ and committed with the
    records (depth extrapolation, exit rules), so a report regenerates without the checkpoints.
    Returns {key: result} for `keys`; `evaluate(trial_dir, missing) -> {key: result}` runs only for
    the keys not kept yet, or kept from an earlier record of the cell: a result belongs to one
    trained model, and a cell retrained since (another config, a new trial) has a new record."""
    path = cell_result_path(sweep_dir, name, cell["key"])
    results = json.loads(path.read_text()) if path.exists() else {}
    source = {"trial": cell["trial"], "config_hash": cell.get("config_hash"), "value": cell.get("value")}
    missing = [k for k in keys if (results.get(k) or {}).get("record") != source]
    if missing:
        commit = git_commit()
        new = evaluate(trial_dir(sweep_dir, cell["trial"]), missing)
        results.update({k: {**new[k], "commit": commit, "record": source} for k in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
    return {k: results[k] for k in keys}


def add_train_curves(sweep_dir: Path) -> int:
    """Fill in ``train`` for the complete records that predate it, from their trial's
    metrics.jsonl where it is still on this machine; how many records changed."""
    changed = 0
    for path in sorted((Path(sweep_dir) / RECORDS).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("train") or rec.get("status") != "complete":
            continue
        curve = train_curve(trial_dir(sweep_dir, rec["trial"]), [e["step"] for e in rec["evals"]])
        if curve:
            rec["train"] = curve
            write_json(path, rec)
            changed += 1
    return changed


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, data) -> Path:
    """JSON via temp + rename: a concurrent reader (a report, a resumed study) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write(workdir: Path, manifest: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_json(workdir / MANIFEST, _finite(manifest))


def record_path(sweep_dir: Path, key: str) -> Path:
    """DIR/records/<cell key as a file name>.json ("full|seed=0" -> full__seed=0.json)."""
    return Path(sweep_dir) / RECORDS / (re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", key.replace("|", "__")) + ".json")


def write_record(sweep_dir: Path, manifest: dict) -> Path:
    """The cell's record: its latest attempt's manifest (committed with the study)."""
    path = record_path(sweep_dir, manifest["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, _finite(manifest))


def read_all(sweep_dir: Path) -> list[dict]:
    """The sweep's trials, in trial order: its records (DIR/records/*.json) when it has any, else the
    manifests under DIR/trials (a sweep dir from before records)."""
    d = Path(sweep_dir)
    paths = sorted((d / RECORDS).glob("*.json")) or sorted((d / "trials").glob(f"*/{MANIFEST}"))
    out = [json.loads(p.read_text()) for p in paths]
    return sorted(out, key=lambda m: (m["trial"], m["key"]))


def done_cells(sweep_dir: Path, cells) -> set[str]:
    """Keys of the cells whose record is complete and was run with the cell's config: a study resumed
    from committed records (another machine, no optuna database) does not rerun them."""
    by_key = {c.key: c for c in cells}
    done = set()
    for m in read_all(sweep_dir):
        cell = by_key.get(m["key"])
        if cell is None or m.get("status") != "complete":
            continue
        if m.get("config_hash") == config_hash(cell.config) or same_config(m.get("config"), cell.config):
            done.add(m["key"])
    return done


def same_config(recorded: dict | None, cfg: Config) -> bool:
    """Was a record run with this config? Field by field, where a field the record predates counts
    as the same only at its default (a field is added with the default that keeps the old behaviour),
    so adding a config field does not orphan every committed record, and a field set away from its
    default is never assumed (so a field's default must never change). The name is not part of a
    run's identity."""

    def walk(rec: dict, now: dict, default: dict) -> bool:
        if set(rec) - set(now):  # a field that no longer exists: not provably the same run
            return False
        for k, v in now.items():
            if k not in rec:
                if v != default.get(k):
                    return False
            elif isinstance(v, dict) and isinstance(rec[k], dict):
                if not walk(rec[k], v, default.get(k) or {}):
                    return False
            elif rec[k] != v:
                return False
        return True

    now = json.loads(json.dumps(config_to_dict(cfg)))  # tuples as the record holds them: lists
    if not isinstance(recorded, dict) or set(now) - set(recorded) - {"name"}:
        return False  # no config, or a whole section missing: nothing to compare, not the same run
    default = json.loads(json.dumps(config_to_dict(Config())))
    return walk({k: v for k, v in recorded.items() if k != "name"}, {k: v for k, v in now.items() if k != "name"},
                default)  # fmt: skip
