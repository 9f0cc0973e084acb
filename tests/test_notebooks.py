"""Execute both analysis notebooks top to bottom (nbclient, kernel python3) on tiny inputs."""

from pathlib import Path

import nbformat
import pytest
from conftest import ROOT

from asura.analysis import sweep_results
from asura.config import load_config

nbclient = pytest.importorskip("nbclient")
REPO = ROOT


def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "stored with outputs"
    resources = {"metadata": {"path": str(REPO)}}  # cwd = repo root
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources)
    client.execute()
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


def make_sweep_dir(root: Path) -> Path:
    """A small sweep dir written with the sweep package's own manifest and report writers."""
    from asura.sweep import manifest
    from asura.sweep.report import write_report

    d = root / "sweep"
    trials = [("full", "projconcat", 0), ("full", "projconcat", 1), ("add", "add", 0)]
    for trial, (group, inj, seed) in enumerate(trials):
        cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.injection={inj}", f"train.seed={seed}"])
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


def test_read_sweep(tmp_path):
    res = sweep_results.read_sweep(make_sweep_dir(tmp_path))
    assert [r["group"] for r in res.rows] == ["full", "add"] and len(res.manifests) == 3
    ds, mean, _ = sweep_results.final_by_depth(res, "ce")["full"]
    assert list(ds) == [1, 2, 3, 4] and mean[2] == pytest.approx(2.0 - 0.15 + 0.005)
    assert res.summary_md.startswith("# Sweep") and res.plots
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sweep_results.read_sweep(tmp_path / "nope")


def test_loop_depth_notebook_on_a_make_demo_workdir(tmp_path, monkeypatch):
    """The user's own run: a workdir written by train.py on configs/demo.yaml (what `make demo` runs),
    with extrapolation 'none' in its config; depths past max_iterations are chosen at evaluation time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("asura_train_script", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    wd = tmp_path / "demo"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--workdir", str(wd), "train.steps=3"]
    assert train.main([*args, "train.eval_every=3", "train.checkpoint_every=3", "train.progress=false"]) == 0
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    monkeypatch.setenv("ASURA_NB_WORKDIR", str(wd))
    text = _text(_execute("loop_depth.ipynb"))
    assert f"analysing the trained run in {wd}" in text
    assert "extrapolation='last' (chosen at evaluation time)" in text
    assert "(extrapolated)" in text and "oracle" in text
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before  # analysis wrote nothing


def test_ablations_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("ASURA_SWEEP_DIR", str(make_sweep_dir(tmp_path)))
    monkeypatch.delenv("ASURA_NB_RUN_SWEEP", raising=False)
    text = _text(_execute("ablations.ipynb"))
    assert "3 trials, 2 groups" in text and "metric_vs_flops.png" in text
