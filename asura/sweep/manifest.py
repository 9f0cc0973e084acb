"""Per-trial manifest (DIR/trials/<id>/manifest.json): everything a fair comparison needs.

Resolved config, unique params and FLOPs/token from the accountant, tokens seen, the depth
distribution and bptt_k, metrics at every evaluated depth, wall time and status, and the overrides
given outside the spec file (study preset, command line). Reports
and comparisons read manifests only, so they work without the optuna storage.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

from asura.config.load import config_to_dict
from asura.config.schema import Config
from asura.flops import summary

MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


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
        "wall_s": round(wall_s, 3),
        **accounting(cfg, steps_done),
        "config": config_to_dict(cfg),
    }


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


def read_all(sweep_dir: Path) -> list[dict]:
    """Every trial manifest under DIR/trials, in trial order."""
    out = []
    for p in sorted((Path(sweep_dir) / "trials").glob(f"*/{MANIFEST}")):
        out.append(json.loads(p.read_text()))
    return sorted(out, key=lambda m: m["trial"])
