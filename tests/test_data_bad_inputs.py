"""Bad data inputs are answered with one line that names the file or key, before any compilation.

Two tables: check_compatible (what train.py runs before JAX compiles anything) and the
prepare CLI (exit status 2, one line on stderr, nothing half-written left behind).
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data_pipeline import make_cfg

from asura.data import pipeline, prepare

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small prepared corpus that passes check_compatible: 40 documents, about 10% held out."""
    root = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(["ab", "cd", "efg"], size=50)))
    out = root / "shards"
    argv = ["--input", str(root / "*.txt"), "--output", str(out), "--eval-fraction", "0.1", "--eval-min-tokens", "200"]
    assert prepare.main(argv) == 0
    pipeline.check_compatible(make_cfg("data.source=text", f"data.path={out}"))
    return out


def _overwrite(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _truncate(name: str):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:100])


def _remove_eval(d):
    for p in d.glob("eval-*"):
        p.unlink()


def _stale_count(d):
    meta = json.loads((d / "metadata.json").read_text())
    meta["shards"]["train-00000.array_record"]["documents"] += 3
    (d / "metadata.json").write_text(json.dumps(meta))


def _shrink_vocab(d):
    meta = json.loads((d / "metadata.json").read_text())
    meta["vocab_size"] = 50  # the byte tokens are >= 97
    (d / "metadata.json").write_text(json.dumps(meta))


def _no_edit(d):
    pass


# (id, edit of a copy of the good shards, overrides ({d} = that copy), fragments the one line must hold)
CHECK_CASES = [
    (
        "train shard is random bytes",
        _overwrite("train-00000.array_record", os.urandom(200_000)),
        ["data.source=text", "data.path={d}"],
        ["train-00000.array_record", "is not a readable ArrayRecord file"],
    ),
    (
        "eval shard is a text file",
        _overwrite("eval-00000.array_record", README.read_bytes()),
        ["data.source=text", "data.path={d}"],
        ["eval-00000.array_record", "is not a readable ArrayRecord file"],
    ),
    (
        "train shard truncated",
        _truncate("train-00000.array_record"),
        ["data.source=text", "data.path={d}"],
        ["train-00000.array_record", "is not a readable ArrayRecord file"],
    ),
    (
        "metadata.json is not JSON",
        _overwrite("metadata.json", b"{'format': asura"),
        ["data.source=text", "data.path={d}"],
        ["metadata.json is not valid JSON"],
    ),
    (
        "metadata.json is binary",
        _overwrite("metadata.json", bytes(range(256))),
        ["data.source=text", "data.path={d}"],
        ["metadata.json is not text"],
    ),
    (
        "metadata.json is a JSON list",
        _overwrite("metadata.json", b"[1, 2]"),
        ["data.source=text", "data.path={d}"],
        ["metadata.json has format None, expected 'asura-tokens-v1'"],
    ),
    (
        "metadata.json counts another shard",
        _stale_count,
        ["data.source=text", "data.path={d}"],
        ["train-00000.array_record", "records but its metadata.json lists"],
    ),
    (
        "metadata.json vocab below the tokens",
        _shrink_vocab,
        ["data.source=text", "data.path={d}"],
        ["train-00000.array_record", "not <i4 token ids in [0, 50)"],
    ),
    (
        "no eval split",
        _remove_eval,
        ["data.source=text", "data.path={d}"],
        ["has no eval split", "eval-*.array_record"],
    ),
    (
        "tokenizer file missing (text)",
        _no_edit,
        ["data.source=text", "data.path={d}", "data.tokenizer={d}/missing-tok.json"],
        ["data.tokenizer file", "missing-tok.json", "does not exist"],
    ),
    (
        "tokenizer given to task",
        _no_edit,
        ["data.source=task", "data.tokenizer={d}/missing-tok.json"],
        ["data.tokenizer=", "missing-tok.json", "only applies to data.source=text"],
    ),
    (
        "tokenizer given to synthetic",
        _no_edit,
        ["data.source=synthetic", "data.tokenizer=tiktoken:cl100k_base"],
        ["data.tokenizer='tiktoken:cl100k_base' only applies to data.source=text"],
    ),
]


@pytest.mark.parametrize("edit, overrides, fragments", [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check_compatible_answers_one_line(good, tmp_path, edit, overrides, fragments):
    d = tmp_path / "shards"
    shutil.copytree(good, d)
    edit(d)
    cfg = make_cfg(*(o.format(d=d) for o in overrides))
    with pytest.raises(ValueError) as e:
        pipeline.check_compatible(cfg)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_unknown_source_names_the_valid_ones():
    cfg = make_cfg()
    bad = cfg.replace(data=dataclasses.replace(cfg.data, source="video"))
    for call in (pipeline.check_compatible, pipeline.data_vocab_size, pipeline.build_train_iterator):
        with pytest.raises(ValueError) as e:
            call(bad)
        assert str(e.value) == "data.source='video' is not valid; choose one of task, text, synthetic"


# (id, argv ({out}, {bin}, {file}, {jsonl}, {small}, {empty} are paths), fragments of the one stderr line)
CLI_CASES = [
    ("no arguments", [], ["no source", "--input", "--builtin", "--hf-dataset"]),
    ("bad --builtin", ["--builtin", "nope", "--output", "{out}"], ["--builtin='nope' is not valid", "pydoc"]),
    ("unknown flag", ["--bogus"], ["unknown argument '--bogus'", "--builtin"]),
    ("misspelt flag", ["--bulitin", "pydoc", "--output", "{out}"], ["did you mean --builtin?"]),
    ("no --output", ["--builtin", "pydoc"], ["no --output"]),
    ("binary --input", ["--input", "{bin}", "--output", "{out}"], ["{bin}", "is not UTF-8 text"]),
    ("--output is a file", ["--builtin", "pydoc", "--output", "{file}"], ["{file}", "is an existing file"]),
    ("bad .jsonl line", ["--input", "{jsonl}", "--output", "{out}"], ["{jsonl}:2 is not JSON"]),
    ("corpus too small", ["--input", "{small}", "--output", "{out}"], ["only 300 tokens", "--eval-min-tokens"]),
    ("corpus empty", ["--input", "{empty}", "--output", "{out}"], ["no non-empty documents"]),
    ("--eval-fraction 0", ["--builtin", "pydoc", "--output", "{out}", "--eval-fraction", "0"], ["--eval-fraction"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_prepare_cli_answers_one_line(tmp_path, capsys, argv, fragments):
    names = {"out": "out", "bin": "a.bin", "file": "f", "jsonl": "c.jsonl", "small": "s", "empty": "e"}
    paths = {k: str(tmp_path / v) for k, v in names.items()}
    (tmp_path / "a.bin").write_bytes(b"text first, " * 1000 + bytes(range(128, 256)))  # fails late: after writing
    (tmp_path / "f").write_text("a file")
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "s").write_text("x" * 300)
    (tmp_path / "e").write_text("")
    assert prepare.main([a.format(**paths) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(f.format(**paths) in err for f in fragments), err
    assert not os.path.exists(paths["out"])  # nothing half-written is left behind
