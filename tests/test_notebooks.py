"""Execute both analysis notebooks top to bottom (nbclient, kernel python3) on tiny inputs."""

import re

import nbformat
import pytest
from conftest import ROOT, train_main
from test_analysis_helpers import make_sweep_dir

from asura.analysis import sweep_results

nbclient = pytest.importorskip("nbclient")
REPO = ROOT


def _execute(name: str, nb: nbformat.NotebookNode | None = None) -> nbformat.NotebookNode:
    nb = nb or _read(name)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "stored with outputs"
    resources = {"metadata": {"path": str(REPO)}}  # cwd = repo root
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources)
    client.execute()
    return nb


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "notebooks" / name, as_version=4)


def _readme_sweep() -> tuple[str, str]:
    """(spec, --workdir) of the sweep command in the README's "Common commands"."""
    found = re.search(r"-m asura\.sweep (configs/sweeps/\S+\.yaml) --workdir (\S+)", (REPO / "README.md").read_text())
    assert found, "README.md shows no `python -m asura.sweep SPEC --workdir DIR` command"
    return found[1], found[2]


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


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
    wd = tmp_path / "demo"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--workdir", str(wd), "train.steps=3"]
    assert train_main()([*args, "train.eval_every=3", "train.checkpoint_every=3", "train.progress=false"]) == 0
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    monkeypatch.setenv("ASURA_NB_WORKDIR", str(wd))
    text = _text(_execute("loop_depth.ipynb"))
    assert f"analysing the trained run in {wd}" in text
    assert "extrapolation='last' (chosen at evaluation time)" in text
    assert "(extrapolated)" in text and "oracle" in text
    best = dict(re.findall(r"^\s*(\w+): best acc ([\d.]+) at mean depth", text, re.M))
    assert "oracle" in best and all(float(best["oracle"]) >= float(v) for v in best.values()), best
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before  # analysis wrote nothing


def test_ablations_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("ASURA_SWEEP_DIR", str(make_sweep_dir(tmp_path)))
    monkeypatch.delenv("ASURA_NB_RUN_SWEEP", raising=False)
    text = _text(_execute("ablations.ipynb"))
    assert "3 trials, 2 groups" in text and "metric_vs_flops.png" in text


def test_ablations_notebook_reads_the_readme_sweep_dir_by_default():
    _, workdir = _readme_sweep()
    source = "\n".join(c.source for c in _read("ablations.ipynb").cells if c.cell_type == "code")
    default = re.search(r'os\.environ\.get\("ASURA_SWEEP_DIR", "([^"]+)"\)', source)
    assert default and default[1] == workdir, (default and default[1], workdir)


def test_ablations_notebook_without_results_stops_naming_the_command(tmp_path, monkeypatch):
    spec, _ = _readme_sweep()
    empty = tmp_path / "no_sweep"
    monkeypatch.setenv("ASURA_SWEEP_DIR", str(empty))
    monkeypatch.delenv("ASURA_NB_RUN_SWEEP", raising=False)
    nb = _read("ablations.ipynb")
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        _execute("ablations.ipynb", nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    (error,) = [o for o in code[0].outputs if o.output_type == "error"]
    assert f"asura.sweep {spec} --workdir {empty}" in error.evalue and len(error.traceback) == 1, error
    assert all(c.execution_count is None and not c.outputs for c in code[1:])  # no empty cells ran
