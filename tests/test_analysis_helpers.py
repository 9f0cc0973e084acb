"""Shared helpers for the analysis and notebook tests (no tests here)."""

from pathlib import Path

from conftest import ROOT

from asura.config import load_config


def make_sweep_dir(root: Path) -> Path:
    """A small sweep dir written with the sweep package's own manifest and report writers."""
    from asura.sweep import manifest
    from asura.sweep.report import write_report

    d = root / "sweep"
    trials = [("full", "projconcat", 0), ("full", "projconcat", 1), ("add", "add", 0)]
    for trial, (group, inj, seed) in enumerate(trials):
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.injection={inj}", f"train.seed={seed}"])
        final = {n: {"ce": 2.0 + 0.1 * (inj == "add") - 0.05 * n + 0.01 * seed, "exact_match": 0.1 * n}
                 for n in (1, 2, 3, 4)}  # fmt: skip
        cell = {"key": f"{group}|seed={seed}", "group": group, "seed": seed, "role": "variant", "parent": None,
                "overrides": {"model.injection": inj}, "aliases": []}  # fmt: skip
        m = manifest.build(
            trial=trial, cell=cell, cfg=cfg, status="complete", metric="ce", value=final[3]["ce"],
            evals=[(300, final)], final=final, steps_done=300, wall_s=1.0,
        )  # fmt: skip
        manifest.write(d / "trials" / str(trial), m)
    write_report(d)
    return d
