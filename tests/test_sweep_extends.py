"""`extends:` in sweep specs: a child spec starts from its parent's (relative paths stay the parent's),
merges mappings one level deep, names its own sweep; a cycle is one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from test_sweep_helpers import REPO, TINY

from asura.sweep.spec import SpecError, load_spec


def _write(path, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def parent(tmp_path):
    """A parent spec in its own dir, naming its base relative to itself (as configs/sweeps/*.yaml do)."""
    where = tmp_path / "parents" / "parent.yaml"
    base = os.path.relpath(REPO / "configs" / "demo.yaml", where.parent)
    return _write(where, base=base, study_name="parent_sweep", overrides=dict(TINY), variants={"full": {}},
                  seeds=[0, 1], metric="exact_match")  # fmt: skip


def test_child_inherits_merges_and_names_its_own_sweep(tmp_path, parent):
    child = _write(tmp_path / "children" / "child.yaml", extends="../parents/parent.yaml",
                   overrides={"train.steps": 18}, variants={"add": {"model.injection": "add"}}, seeds=[3])  # fmt: skip
    spec = load_spec(child)
    assert spec.base == (REPO / "configs" / "demo.yaml").resolve()  # relative to the parent, not the child
    assert [c.key for c in spec.grid.cells] == ["full|seed=3", "add|seed=3"]  # variants merged, seeds replaced
    cfg = spec.grid.cells[1].config
    assert (cfg.train.steps, cfg.model.d_model, cfg.model.injection) == (18, TINY["model.d_model"], "add")
    assert spec.metric.label == "exact_match"  # inherited
    assert spec.study_name == "child"  # never the parent's: its default dir would mix both sweeps' trials


def test_a_list_of_parents_merges_left_to_right(tmp_path, parent):
    _write(tmp_path / "other.yaml", overrides={"train.steps": 24, "train.lr": 0.01})
    child = _write(tmp_path / "child.yaml", extends=["parents/parent.yaml", "other.yaml"])
    cfg = load_spec(child).grid.cells[0].config
    assert (cfg.train.steps, cfg.train.lr, cfg.model.d_model) == (24, 0.01, TINY["model.d_model"])


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"extends": "missing.yaml"}, "sweep spec not found: "),
        ({"extends": 3}, "extends must be a spec path or a list of them, got 3"),
        ({"extends": "parents/bad.yaml"}, "sweep spec bad.yaml: unknown key 'axis'; did you mean 'axes'?"),
    ],
)
def test_bad_parents_are_one_line(tmp_path, parent, fields, needle):
    _write(tmp_path / "parents" / "bad.yaml", base="../x.yaml", axis={})
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path / "child.yaml", **fields))
    assert needle in str(e.value) and "\n" not in str(e.value), e.value


def test_a_cycle_is_refused_in_one_line_by_the_cli(tmp_path):
    _write(tmp_path / "a.yaml", extends="b.yaml", base=str(REPO / "configs" / "demo.yaml"))
    _write(tmp_path / "b.yaml", extends="a.yaml")
    p = subprocess.run([sys.executable, "-m", "asura.sweep", str(tmp_path / "a.yaml"), "--dry-run"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert "`extends` cycle: a.yaml -> b.yaml -> a.yaml" in p.stderr
