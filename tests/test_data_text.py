"""Real-text path: prepare CLI round trips, tokenizers, text pipeline resume/coverage, bad-input errors."""

import collections
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from test_data_pipeline import assert_batches_equal, check_row_invariants, make_cfg, take

from asura.data import pipeline, prepare, text, tokenizer

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "over",
    "hills",
    "and",
    "rivers",
    "under",
    "grey",
]


def write_corpus(root, n_docs=24, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(3, 60))
        doc = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=n))
        doc += " é" if i % 5 == 0 else ""  # a multi-byte character survives the byte round trip
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
        docs.append(doc)
    return docs


def read_split(out, split):
    src = text.resolve_shards(str(out), split)
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    ds = ArrayRecordDataSource(list(src.paths))
    return [text.decode_record(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root)
    out = root / "shards"
    globs = [str(root / f"doc0{i}*.txt") for i in range(3)]  # several globs, in order
    argv = ["--input", *globs, "--output", str(out)]
    assert prepare.main([*argv, "--eval-every", "6", "--docs-per-shard", "5"]) == 0
    return root, docs, out


def test_prepare_byte_round_trip(corpus):
    _, docs, out = corpus
    meta = json.loads((out / "metadata.json").read_text())
    train_docs = [d for i, d in enumerate(docs) if i % 6 != 5]
    eval_docs = [d for i, d in enumerate(docs) if i % 6 == 5]
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256
    assert meta["train"]["documents"] == len(train_docs) and meta["eval"]["documents"] == len(eval_docs)
    assert meta["train"]["tokens"] == sum(len(d.encode()) for d in train_docs)
    assert len([s for s in meta["shards"] if s.startswith("train-")]) == -(-len(train_docs) // 5)
    assert [bytes(t.astype(np.uint8)).decode() for t in read_split(out, "train")] == train_docs
    assert [bytes(t.astype(np.uint8)).decode() for t in read_split(out, "eval")] == eval_docs


def test_prepare_wordlevel_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = str(tmp_path / "wordlevel.json")
    tok.save(tok_path)
    docs = ["the cat sat", "dogs ran over hills", "a mat under the hills"]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    argv = ["--input", str(src), "--text-field", "body", "--output", str(out), "--tokenizer", tok_path]
    assert prepare.main([*argv, "--eval-every", "0"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["vocab_size"] == len(vocab) and meta["train"]["tokens"] == 12
    dec = tokenizer.load_tokenizer(tok_path)
    assert [dec.decode(ids) for ids in read_split(out, "train")] == docs
    cfg = make_cfg("data.source=text", f"data.path={out}", f"data.tokenizer={tok_path}", "data.seq_len=8")
    assert pipeline.data_vocab_size(cfg) == len(vocab)
    pipeline.check_compatible(cfg)


def test_prepare_hf_dataset_through_injected_loader(tmp_path):
    rows = [{"text": f"document number {i}", "id": i} for i in range(7)]
    calls = []

    def loader(name, split, config):
        calls.append((name, split, config))
        return iter(rows)

    out = tmp_path / "hf"
    argv = ["--hf-dataset", "local/toy", "--hf-split", "validation", "--output", str(out), "--eval-every", "0"]
    assert prepare.main(argv, hf_loader=loader) == 0
    assert calls == [("local/toy", "validation", None)]
    got = [bytes(t.astype(np.uint8)).decode() for t in read_split(out, "train")]
    assert got == [r["text"] for r in rows]
    with pytest.raises(ValueError, match=r"--hf-text-field 'body' not in row 0 of local/toy; fields: \['id', 'text'\]"):
        list(prepare.hf_documents("local/toy", text_field="body", loader=lambda *a: iter(rows)))


def test_prepare_builtin_pydoc(tmp_path):
    assert prepare.main(["--builtin", "pydoc", "--output", str(tmp_path / "p"), "--eval-every", "10"]) == 0
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert meta["train"]["documents"] + meta["eval"]["documents"] > 50 and meta["train"]["tokens"] > 100_000


def text_cfg(out, *overrides):
    return make_cfg("data.source=text", f"data.path={out}", "data.seq_len=32", *overrides)


def expected_chunks(docs, seq_len):
    return [bytes(c) for d in docs for c in text.chunk(np.frombuffer(d.encode(), np.uint8), seq_len)]


def segment_bytes(batches):
    out = []
    for b in batches:
        for inp_T, seg_T in zip(b["inputs"], b["segment_ids"]):
            out += [bytes(inp_T[seg_T == s].astype(np.uint8)) for s in range(1, seg_T.max() + 1)]
    return out


@pytest.mark.parametrize("pack", ["true", "false"])
def test_text_epoch_covers_every_token_once(corpus, pack):
    _, docs, out = corpus
    cfg = text_cfg(out, "data.num_epochs=1", f"data.pack={pack}", "data.seq_len=24")
    batches = take(pipeline.build_train_iterator(cfg))
    for b in batches:
        check_row_invariants(b)
        n_docs = sum(int(seg_T.max()) for seg_T in b["segment_ids"])
        assert b["loss_mask"].sum() == (b["segment_ids"] > 0).sum() - n_docs  # text scores every in-doc target
    train_docs = [d for i, d in enumerate(docs) if i % 6 != 5]
    assert collections.Counter(segment_bytes(batches)) == collections.Counter(expected_chunks(train_docs, 24))
    n_real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert n_real == sum(len(d.encode()) for d in train_docs)


def test_text_resume_with_shuffle_and_epochs(corpus):
    _, _, out = corpus
    cfg = text_cfg(out, "data.num_epochs=2", "data.shuffle=true")
    full = take(pipeline.build_train_iterator(cfg))
    assert len(full) > 6
    for n in (2, len(full) // 2 + 1):
        it = pipeline.build_train_iterator(cfg)
        head = take(it, n)
        state = json.loads(json.dumps(it.get_state()))
        fresh = pipeline.build_train_iterator(cfg)
        fresh.set_state(state)
        assert_batches_equal(head + take(fresh), full)


def test_text_process_slices_disjoint_and_covering(corpus):
    _, docs, out = corpus
    cfg = text_cfg(out, "data.num_epochs=1", "train.batch_size=4")
    per_proc = [
        segment_bytes(take(pipeline.build_train_iterator(cfg, process_index=i, process_count=2))) for i in range(2)
    ]
    assert not set(per_proc[0]) & set(per_proc[1])
    train_docs = [d for i, d in enumerate(docs) if i % 6 != 5]
    assert collections.Counter(per_proc[0] + per_proc[1]) == collections.Counter(expected_chunks(train_docs, 32))


def test_text_eval_batches_use_eval_shards(corpus):
    _, docs, out = corpus
    ev = pipeline.build_eval_batches(text_cfg(out), 5)
    eval_docs = [d for i, d in enumerate(docs) if i % 6 == 5]
    assert collections.Counter(segment_bytes(ev)) == collections.Counter(expected_chunks(eval_docs, 32))


def test_text_check_compatible_errors(corpus, tmp_path):
    _, _, out = corpus
    pipeline.check_compatible(text_cfg(out))
    cases = [
        (text_cfg(tmp_path / "nothing-*.array_record"), "matches no train shards"),
        (text_cfg(out, "model.vocab_size=200"), "data needs vocab_size >= 256 .* model.vocab_size=200"),
        (text_cfg(out, "data.pack=false", "data.seq_len=4096"), "data.seq_len=4096 but the longest document"),
        (text_cfg(out, "data.tokenizer=tiktoken:cl100k_base"), "were tokenised with 'byte'"),
    ]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train-00000.array_record").write_bytes(b"x")
    cases.append((text_cfg(bare), "no metadata.json next to the shards"))
    empty = tmp_path / "empty"
    shutil.copytree(out, empty)
    open(empty / "train-00001.array_record", "w").close()
    cases.append((text_cfg(empty), "train-00001.array_record' is empty"))
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            pipeline.check_compatible(cfg)


def test_prepare_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--input", str(tmp_path / "none*.txt"), "--output", out], "matches no files"),
        (["--builtin", "pydoc", "--output", out, "--tokenizer", "gpt9"], "unknown tokenizer 'gpt9'; valid: byte"),
        (["--builtin", "pydoc", "--output", out, "--tokenizer", "missing.json"], "'missing.json' does not exist"),
        (["--builtin", "pydoc", "--output", out, "--tokenizer", "tiktoken:no_such_enc"], "tiktoken encoding"),
    ]
    if importlib.util.find_spec("datasets") is None:  # with it installed this would try the network
        cases.append((["--hf-dataset", "x/y", "--output", out], "needs the `datasets` package"))
    for argv, match in cases:
        assert prepare.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert prepare.main(["--builtin", "pydoc", "--output", out]) == 0
    assert prepare.main(["--builtin", "pydoc", "--output", out]) == 2
    assert "already holds prepared shards; pass --overwrite" in capsys.readouterr().err
    assert prepare.main(["--builtin", "pydoc", "--output", out, "--overwrite"]) == 0
    assert os.path.isfile(os.path.join(out, "metadata.json"))
