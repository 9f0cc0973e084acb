"""Run paths go through asura.storage.paths.to_path: `pathlib.Path("gs://b/x")` is the local directory
`gs:/b/x` (a user's pod command once created one, wrote a lock and a log into it, then crashed).

The modules that take a run path (a workdir, a checkpoint directory, data, an output the user names)
may build a `pathlib.Path` only from `os.fspath(...)` of a path already known to be local, a string
literal, or a temporary file of their own; this test reads their syntax trees and refuses any other
`Path(...)` call, so a new one on a user's path cannot slip in. It also runs `to_path` on the forms
users type.
"""

from __future__ import annotations

import ast
import os

import pytest
from conftest import ROOT

from asura.storage.paths import StorageError, is_remote, to_path

RUN_PATH_MODULES = [
    "train.py",
    "asura/evaluate.py",
    "asura/generate.py",
    "asura/io/load.py",
    "asura/data/text.py",
    "asura/data/prepare.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "asura" / "train").glob("*.py")),
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "asura" / "infer").glob("*.py")),
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "asura" / "storage").glob("*.py")),
]
# Path(...) arguments that are local by construction (each checked by name, so a new one is a decision)
LOCAL_BY_CONSTRUCTION = {"self.staging", "self.writer._file_name", "path"}  # path: read_jsonl's local file


def _is_ok(arg: ast.expr) -> bool:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return True
    if isinstance(arg, ast.Call) and ast.unparse(arg.func) == "os.fspath":
        return True
    return ast.unparse(arg) in LOCAL_BY_CONSTRUCTION


def path_calls(module: str) -> list[tuple[int, str]]:
    tree = ast.parse((ROOT / module).read_text())
    out = []
    for node in ast.walk(tree):
        is_path = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path"
        if is_path and (not node.args or not _is_ok(node.args[0])):
            out.append((node.lineno, ast.unparse(node)))
    return out


def test_run_path_modules_build_no_pathlib_path_from_a_users_path():
    bad = {m: calls for m in RUN_PATH_MODULES if (calls := path_calls(m))}
    assert not bad, f"use asura.storage.paths.to_path for run paths: {bad}"


def test_the_guard_sees_a_path_of_a_users_string(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from pathlib import Path\ndef f(workdir):\n    return Path(workdir) / 'x'\n")
    assert path_calls(os.path.relpath(src, ROOT)) == [(3, "Path(workdir)")]


@pytest.mark.parametrize(
    ("text", "remote", "shown"),
    [
        ("runs/demo", False, "runs/demo"),
        ("/abs/run dir", False, "/abs/run dir"),
        ("gs://my-bucket/runs/looped_350m", True, "gs://my-bucket/runs/looped_350m"),
        ("gs://my-bucket/runs/x/", True, "gs://my-bucket/runs/x"),
    ],
)
def test_to_path_keeps_the_scheme(text, remote, shown):
    if remote:  # a gs:// path needs the gcs extra, as every other gs:// test (conftest)
        pytest.importorskip("gcsfs", reason="gs:// tests need the gcs extra (pip install 'asura[gcs]')")
    p = to_path(text)
    assert is_remote(p) == remote and str(p) == shown
    assert str(p / "checkpoints") == f"{shown}/checkpoints"  # no collapsed `//`


@pytest.mark.parametrize("text", ["s3://b/x", "http://host/x", "gs://UPPER/x", "gs://ab/x"])
def test_to_path_refuses_what_it_cannot_serve(text):
    with pytest.raises(StorageError):
        to_path(text)
