"""The package layering the data flow reads from (issue #31): a trained model is read by asura.io,
which sits below both the analysis tools and inference; inference never imports analysis, and the
I/O layer imports neither. Checked on the syntax trees, so an import inside a function counts too."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

# package -> packages it must not import (anywhere in its modules, lazily or not)
FORBIDDEN = {
    "asura/infer": ("asura.analysis",),
    "asura/io": ("asura.analysis", "asura.infer", "asura.sweep"),
}


def imported_modules(path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    bad = [
        f"{py.relative_to(ROOT)}:{line} imports {name}"
        for py in sorted((ROOT / package).glob("*.py"))
        for line, name in imported_modules(py)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, bad


def test_the_check_sees_a_lazy_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from asura.analysis.depth import evaluate_depths\n    from asura import analysis\n")
    assert [n for _, n in imported_modules(src)] == [
        "asura.analysis.depth", "asura.analysis.depth.evaluate_depths", "asura", "asura.analysis",
    ]  # fmt: skip


def test_every_package_is_installed():
    """pyproject lists packages explicitly, so a new package left out works in the editable checkout and is
    missing from a wheel; every folder with an __init__.py is listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asura").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set(), "listed in pyproject.toml but not a package folder"


def test_no_top_level_package_shadows_an_installed_one():
    """Commands run from the repository root put it first on sys.path, so a top-level package folder there
    shadows any installed package of that name (a top-level kernels/ broke transformers, which imports
    Hugging Face's `kernels`). Only asura (and the tests and examples, not packages) sit at the root."""
    top = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert top == ["asura"], top
