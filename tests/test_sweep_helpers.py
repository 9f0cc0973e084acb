"""Shared helpers for the sweep tests (no tests here): tiny specs and a fake trial function."""

from __future__ import annotations

from pathlib import Path

import yaml

from asura.depth import eval_depths

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model.d_model": 32,
    "model.n_heads": 4,
    "model.n_layers": 1,
    "model.iterations": 2,
    "model.max_iterations": 2,
    "data.seq_len": 32,
    "train.batch_size": 8,
    "train.steps": 12,
    "train.eval_every": 6,
    "train.log_every": 6,
    "train.checkpoint_every": 12,
    "train.eval_batches": 1,
    "train.warmup_steps": 2,
    "train.progress": False,
    "train.tensorboard": False,
    "train.async_checkpoint": False,
}
EXECUTIONS: list[str] = []  # one entry per fake trial run: injection|layers|seed


def write_spec(tmp_path: Path, name: str = "spec", **fields) -> Path:
    spec = {"base": str(REPO / "configs" / "demo.yaml"), "overrides": dict(TINY), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_ce(cfg, step: int, depth: int) -> float:
    """Deterministic: injection none > add > projconcat, bigger models lower, decreasing in step."""
    bias = {"projconcat": 0.0, "add": 0.3, "none": 0.6}[cfg.model.injection]
    return (
        3.0 + bias + 0.01 * cfg.train.seed + 10.0 / step - 1e-5 * cfg.model.n_layers * cfg.model.d_model + 0.01 * depth
    )


def fake_metrics(cfg, step: int, depth: int) -> dict[str, float]:
    """One depth of an eval record, named as the train loop names them (eval/d{n}/{name})."""
    ce = fake_ce(cfg, step, depth)
    return {"ce": ce, "objective": ce + cfg.model.z_loss, "accuracy": 0.25, "exact_match": 0.5, "tokens": 256.0}


def fake_trial(cfg, workdir: Path, on_eval) -> dict:
    """Evaluates exactly the depths the real train loop would (asura.depth.eval_depths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    EXECUTIONS.append(f"{cfg.model.injection}|L={cfg.model.n_layers}|seed={cfg.train.seed}")
    final = None
    for step in range(cfg.train.eval_every, cfg.train.steps + 1, cfg.train.eval_every):
        final = {d: fake_metrics(cfg, step, d) for d in eval_depths(cfg)}
        on_eval(step, final)
    return {"final": final, "step": cfg.train.steps}
