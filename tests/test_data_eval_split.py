"""The held-out split of prepared text: the online rule's invariants, and corpora that used to get no eval split."""

import json

import numpy as np
import pytest

from asura.data import prepare, text
from asura.data.eval_split import PIECE_TOKENS, EvalSplit

_rng = np.random.default_rng(0)
CORPORA = {  # document lengths in tokens
    "readme_like": [16304, 3570],  # README.md + docs/*.md: the old every-50th rule held out nothing
    "one_huge": [1_000_000],
    "equal": [1000] * 100,
    "tiny_docs": [7] * 3000,
    "random": [int(n) for n in _rng.integers(1, 20_000, 300)],
    "huge_last": [500] * 50 + [200_000],
}


def run_split(lens, fraction=0.05, min_tokens=2048):
    split = EvalSplit(fraction, min_tokens)
    docs, parts, start = [], [], 0
    for n in lens:
        docs.append(np.arange(start, start + n))
        parts.append(split(docs[-1]))
        start += n
    return split, docs, parts


@pytest.mark.parametrize("name", CORPORA)
def test_every_token_once_in_order_and_eval_near_target(name):
    lens = CORPORA[name]
    split, docs, parts = run_split(lens)
    for doc, part in zip(docs, parts):
        pieces = [p for p in part if p is not None]
        np.testing.assert_array_equal(np.concatenate(pieces), doc)  # head trains, tail evaluates: nothing lost
        assert all(len(p) for p in pieces)
    eval_tokens = sum(len(p.eval) for p in parts if p.eval is not None)
    total = sum(lens)
    assert eval_tokens == split.eval_tokens and split.seen == total
    assert eval_tokens >= 2048 and any(p.eval is not None for p in parts)
    target = max(0.05 * total, 2048)
    assert abs(eval_tokens - target) <= PIECE_TOKENS + 0.05 * max(lens) + 1, (eval_tokens, target)
    assert split.cut_documents == sum(p.train is not None and p.eval is not None for p in parts)


def test_one_huge_document_gives_its_tail():
    split, _, parts = run_split([1_000_000])
    assert split.cut_documents == 1 and len(parts[0].eval) == 50_000 and parts[0].eval[0] == 950_000


def test_whole_documents_preferred_and_rounded_to_the_nearer_total():
    _, _, parts = run_split(CORPORA["equal"])
    assert all(p.train is None or p.eval is None for p in parts)  # 1000-token documents are never cut
    # three fill the 2048-token floor; after that one goes whenever the 5% share is half a document behind
    assert [i for i, p in enumerate(parts) if p.eval is not None] == [0, 1, 2, 69, 89]


def _prepare_files(tmp_path, sizes):
    rng = np.random.default_rng(1)
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}.md").write_text("".join(rng.choice(list("abcdefgh \n"), size=n)))
    out = tmp_path / "out"
    assert prepare.main(["--input", str(tmp_path / "f*.md"), "--output", str(out)]) == 0
    return json.loads((out / "metadata.json").read_text()), out


@pytest.mark.parametrize("sizes", [[16304, 3570], [200_000], [300] * 40], ids=["readme_like", "one_file", "small"])
def test_prepare_always_writes_an_eval_split(tmp_path, sizes):
    meta, out = _prepare_files(tmp_path, sizes)
    total = meta["train"]["tokens"] + meta["eval"]["tokens"]
    assert total == sum(sizes) and meta["eval"]["documents"] >= 1
    assert meta["eval"]["tokens"] >= min(2048, total // 2)
    assert meta["eval"]["tokens"] <= max(0.05 * total, 2048) + PIECE_TOKENS
    assert text.resolve_shards(str(out), "eval").documents == meta["eval"]["documents"]
