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


def split_docs(out):
    """[train, eval] documents as byte strings (byte tokenizer), in shard order."""
    return [[bytes(t.astype(np.uint8)) for t in read_split(out, s)] for s in ("train", "eval")]


def assert_split_of(docs, train, evals):
    """Each source document is, in order, one train document, one eval document, or a train head + eval tail."""
    i = j = 0
    for d in docs:
        if i < len(train) and train[i] == d:
            i += 1
        elif j < len(evals) and evals[j] == d:
            j += 1
        else:
            assert i < len(train) and j < len(evals) and train[i] + evals[j] == d, d
            i, j = i + 1, j + 1
    assert (i, j) == (len(train), len(evals))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root)
    out = root / "shards"
    globs = [str(root / f"doc0{i}*.txt") for i in range(3)]  # several globs, in order
    argv = ["--input", *globs, "--output", str(out), "--eval-fraction", "0.2", "--eval-min-tokens", "200"]
    assert prepare.main([*argv, "--docs-per-shard", "5"]) == 0
    return root, docs, out


def test_prepare_byte_round_trip(corpus):
    _, docs, out = corpus
    meta = json.loads((out / "metadata.json").read_text())
    train_docs, eval_docs = split_docs(out)
    assert_split_of([d.encode() for d in docs], train_docs, eval_docs)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256
    assert meta["train"]["documents"] == len(train_docs) and meta["eval"]["documents"] == len(eval_docs)
    assert meta["train"]["tokens"] == sum(map(len, train_docs)) and meta["eval"]["tokens"] == sum(map(len, eval_docs))
    assert len([s for s in meta["shards"] if s.startswith("train-")]) == -(-len(train_docs) // 5)
    total, longest = sum(len(d.encode()) for d in docs), max(len(d.encode()) for d in docs)
    assert meta["eval"]["tokens"] >= 200 and abs(meta["eval"]["tokens"] - 0.2 * total) <= longest
    assert meta["eval_split"]["fraction"] == 0.2 and meta["eval_split"]["min_tokens"] == 200


def test_eval_overlap_counts_eval_windows_seen_in_training(corpus):
    """eval_overlap against a plain count: every window of every eval document, looked up among all
    windows of all training documents; metadata.json holds the 32-token count."""
    from asura.data.overlap import eval_overlap

    _, _, out = corpus
    train_docs, eval_docs = split_docs(out)
    for W in (6, 32):
        train_windows = {d[i : i + W] for d in train_docs for i in range(len(d) - W + 1)}
        eval_windows = [d[i : i + W] for d in eval_docs for i in range(len(d) - W + 1)]
        want = sum(w in train_windows for w in eval_windows)
        n = len(eval_windows)
        assert eval_overlap(str(out), W) == {"window": W, "eval_windows": n, "in_train": want, "fraction": want / n}
        if W == 6:  # random words share 6-byte windows across splits, so a count of 0 would be a bug
            assert 0 < want < n
    assert json.loads((out / "metadata.json").read_text())["eval_overlap"] == eval_overlap(str(out), 32)


def test_window_hashes_tell_windows_apart():
    from asura.data.overlap import window_hashes

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=5000)  # few symbols: many repeated windows, and many near misses
    h = window_hashes(ids, 12)
    windows = [tuple(ids[i : i + 12]) for i in range(len(ids) - 11)]
    assert len(h) == len(windows) and len(set(h.tolist())) == len(set(windows))
    assert len(window_hashes(ids[:11], 12)) == 0
    assert window_hashes(np.array([0, 0, 1]), 2)[0] != window_hashes(np.array([0, 0, 1]), 2)[1]  # 0 is not nothing


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
    assert prepare.main([*argv, "--eval-fraction", "0.3", "--eval-min-tokens", "1"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["vocab_size"] == len(vocab) and meta["train"]["tokens"] + meta["eval"]["tokens"] == 12
    dec = tokenizer.load_tokenizer(tok_path)
    # 3, 4, 5 words: the first fills the 1-token floor whole; 30% of 12 tokens needs no more
    assert [dec.decode(ids) for ids in read_split(out, "eval")] == docs[:1]
    assert [dec.decode(ids) for ids in read_split(out, "train")] == docs[1:]
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
    argv = ["--hf-dataset", "local/toy", "--hf-split", "validation", "--output", str(out), "--eval-min-tokens", "1"]
    assert prepare.main(argv, hf_loader=loader) == 0
    assert calls == [("local/toy", "validation", None)]
    train, evals = split_docs(out)
    assert_split_of([r["text"].encode() for r in rows], train, evals)
    assert len(evals) == 1 and len(train) == 6
    with pytest.raises(ValueError, match=r"--hf-text-field 'body' not in row 0 of local/toy; fields: \['id', 'text'\]"):
        list(prepare.hf_documents("local/toy", text_field="body", loader=lambda *a: iter(rows)))


def test_prepare_builtin_pydoc(tmp_path):
    """The offline default must come with an eval split worth evaluating on (it used to be 1 document, 930 tokens)."""
    assert prepare.main(["--builtin", "pydoc", "--output", str(tmp_path / "p")]) == 0
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    train, evals = meta["train"], meta["eval"]
    assert train["documents"] + evals["documents"] > 50 and train["tokens"] > 100_000
    assert evals["documents"] >= 10 and 0.04 <= evals["tokens"] / (train["tokens"] + evals["tokens"]) <= 0.06


def text_cfg(out, *overrides):
    return make_cfg("data.source=text", f"data.path={out}", "data.seq_len=32", *overrides)


def expected_chunks(docs, seq_len):
    """docs: byte strings."""
    return [bytes(c) for d in docs for c in text.chunk(np.frombuffer(d, np.uint8), seq_len)]


def segment_bytes(batches):
    out = []
    for b in batches:
        for inp_T, seg_T in zip(b["inputs"], b["segment_ids"]):
            out += [bytes(inp_T[seg_T == s].astype(np.uint8)) for s in range(1, seg_T.max() + 1)]
    return out


@pytest.mark.parametrize("pack", ["true", "false"])
def test_text_epoch_covers_every_token_once(corpus, pack):
    _, _, out = corpus
    cfg = text_cfg(out, "data.num_epochs=1", f"data.pack={pack}", "data.seq_len=24")
    batches = take(pipeline.build_train_iterator(cfg))
    for b in batches:
        check_row_invariants(b)
        n_docs = sum(int(seg_T.max()) for seg_T in b["segment_ids"])
        assert b["loss_mask"].sum() == (b["segment_ids"] > 0).sum() - n_docs  # text scores every in-doc target
    train_docs, _ = split_docs(out)
    assert collections.Counter(segment_bytes(batches)) == collections.Counter(expected_chunks(train_docs, 24))
    n_real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert n_real == sum(map(len, train_docs))


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
    _, _, out = corpus
    cfg = text_cfg(out, "data.num_epochs=1", "train.batch_size=4")
    per_proc = [
        segment_bytes(take(pipeline.build_train_iterator(cfg, process_index=i, process_count=2))) for i in range(2)
    ]
    assert not set(per_proc[0]) & set(per_proc[1])
    train_docs, _ = split_docs(out)
    assert collections.Counter(per_proc[0] + per_proc[1]) == collections.Counter(expected_chunks(train_docs, 32))


def test_text_eval_batches_use_eval_shards(corpus):
    _, _, out = corpus
    ev = pipeline.build_eval_batches(text_cfg(out), 5)
    _, eval_docs = split_docs(out)
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
