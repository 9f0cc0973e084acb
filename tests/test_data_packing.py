"""The numpy packer against grain's: the same batches as the grain graph it replaced, and exact resume.

The oracle is the graph asura.data.host built before (grain's FirstFitPackIterDataset, or one
document per row, then batching rows), kept here verbatim. Equality with it is what lets a
checkpoint written by either pipeline resume on this one.
"""

import collections
import dataclasses
import functools
import json
import math

import grain
import numpy as np
import pytest
from test_data_pipeline import assert_batches_equal, check_row_invariants, make_cfg, take

from asura.data import host, pipeline, prepare, sources, tasks, text
from asura.data.grain_pack import PackedBatches
from asura.data.packing import FirstFit, model_fields

# ------------------------------------------------------------ the replaced graph (oracle)

_PACKED = ("tokens", "scored", "tokens_segment_ids", "tokens_positions")


def _single_row(doc, *, seq_len):
    tokens_L, scored_L = doc["tokens"], doc["scored"]
    n = len(tokens_L)
    row = {k: np.zeros(seq_len, np.int32) for k in _PACKED}
    row["tokens"][:n], row["scored"][:n], row["tokens_segment_ids"][:n] = tokens_L, scored_L, 1
    row["tokens_positions"][:n] = np.arange(n)
    return row


def _batch_rows(rows, n_rows):
    packed = {}
    for k in _PACKED:
        x_BT = np.stack([r[k] for r in rows])
        if len(rows) < n_rows:
            x_BT = np.concatenate([x_BT, np.zeros((n_rows - len(rows), x_BT.shape[1]), x_BT.dtype)])
        packed[k] = x_BT
    return model_fields(packed)


class _Chunker:
    def __init__(self, seq_len):
        self.seq_len = seq_len

    def flat_map(self, doc):
        pieces = zip(text.chunk(doc["tokens"], self.seq_len), text.chunk(doc["scored"], self.seq_len))
        return [{"tokens": t, "scored": s} for t, s in pieces]


def legacy_graph(doc_map, *, n_rows, seq_len, chunk, one_per_row):
    """grain graph over a MapDataset of documents, as host.batches built it (prefetch left out)."""
    ds = doc_map.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if chunk:
        ds = grain.experimental.FlatMapIterDataset(ds, _Chunker(seq_len))
    if one_per_row:
        ds = ds.map(functools.partial(_single_row, seq_len=seq_len))
    else:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": seq_len, "scored": seq_len}, num_packing_bins=n_rows, shuffle_bins=False
        )
    return ds.batch(n_rows, drop_remainder=False, batch_fn=functools.partial(_batch_rows, n_rows=n_rows))


def both_graphs(cfg, docs, *, process_index=0, process_count=1, shuffle=None, num_epochs=None):
    """(new, legacy) IterDatasets over the same documents: host.batches' own PackedBatches and the oracle."""
    shuffle = cfg.data.shuffle if shuffle is None else shuffle
    num_epochs = cfg.data.num_epochs if num_epochs is None else num_epochs
    kw = dict(process_index=process_index, process_count=process_count, shuffle=shuffle, num_epochs=num_epochs)
    new = host.batches(cfg.replace(data=dataclasses.replace(cfg.data, prefetch=0, worker_count=0)), docs, **kw)
    assert isinstance(new, PackedBatches)
    legacy = legacy_graph(
        new.parents[0], n_rows=new.n_rows, seq_len=new.seq_len, chunk=new.chunk, one_per_row=new.one_per_row
    )
    return new, legacy


def task_docs(cfg, n=sources.TASK_EPOCH):
    return host.task_documents(cfg, stream=tasks.TRAIN_STREAM, difficulty=cfg.data.difficulty, n_examples=n)


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Byte-token shards: 40 documents of 1..300 tokens, so seq_len 24 splits some and 320 none."""
    root = tmp_path_factory.mktemp("pack")
    rng = np.random.default_rng(3)
    for i in range(40):
        n = int(rng.choice([1, 2, 5, 23, 24, 25, 47, 48, 300, *rng.integers(1, 120, size=6)]))
        (root / f"d{i:02d}.txt").write_bytes(bytes(rng.integers(97, 123, size=n).astype(np.uint8)))
    out = root / "shards"
    argv = ["--input", str(root / "*.txt"), "--output", str(out), "--eval-fraction", "0.1", "--eval-min-tokens", "10"]
    assert prepare.main([*argv, "--docs-per-shard", "7"]) == 0
    return out


def text_docs(out):
    return host.text_documents(text.resolve_shards(str(out), "train"))


def text_cfg(out, *overrides):
    return make_cfg("data.source=text", f"data.path={out}", *overrides)


# ------------------------------------------------------------ FirstFit against grain's packer


def random_docs(rng, n, seq_len):
    lengths = rng.choice([0, 1, seq_len - 1, seq_len, *rng.integers(0, seq_len + 1, size=8)], size=n)
    return [
        {"tokens": rng.integers(1, 1000, size=k).astype(np.int32), "scored": rng.integers(0, 2, size=k, dtype=np.int32)}
        for k in lengths
    ]


def first_fit_batches(docs, n_rows, seq_len, max_per_row=None):
    packer, out = FirstFit(n_rows, seq_len, max_per_row), []
    for doc in docs:
        if not packer.add(doc["tokens"], doc["scored"]):
            out.append(packer.take())
            assert packer.add(doc["tokens"], doc["scored"])  # an empty batch takes any piece that fits seq_len
    if len(packer):
        out.append(packer.take())
    return out


@pytest.mark.parametrize("n_rows, seq_len", [(1, 1), (1, 9), (3, 7), (8, 16), (32, 64)])
@pytest.mark.parametrize("max_per_row", [None, 1, 2])
def test_first_fit_equals_grain_first_fit(n_rows, seq_len, max_per_row):
    rng = np.random.default_rng(n_rows * 100 + seq_len)
    with_empty = random_docs(rng, 300, seq_len)  # lengths 0..seq_len
    for docs in (with_empty, [d for d in with_empty if len(d["tokens"])]):
        oracle = grain.experimental.FirstFitPackIterDataset(
            grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0)),
            length_struct={"tokens": seq_len, "scored": seq_len},
            num_packing_bins=n_rows,
            shuffle_bins=False,
            max_sequences_per_bin=max_per_row,
        ).batch(n_rows, drop_remainder=False, batch_fn=functools.partial(_batch_rows, n_rows=n_rows))
        got = first_fit_batches(docs, n_rows, seq_len, max_per_row)
        assert_batches_equal(got, list(oracle))
        # No token lost or duplicated: each non-empty document is one segment of one row.
        segs = [piece for b in got for r in range(n_rows) for piece in _row_segments(b, r)]
        assert collections.Counter(segs) == collections.Counter(d["tokens"].tobytes() for d in docs if len(d["tokens"]))
    for b in got:  # without empty documents (which take a segment id but no token) every row is well formed
        check_row_invariants(b)


def _row_segments(batch, r):
    seg_T = batch["segment_ids"][r]
    return [batch["inputs"][r][seg_T == s].tobytes() for s in np.unique(seg_T[seg_T > 0])]


def test_first_fit_rejects_a_piece_longer_than_a_row():
    with pytest.raises(ValueError, match=r"a piece of 9 tokens does not fit data\.seq_len=8"):
        FirstFit(2, 8).add(np.ones(9, np.int32), np.ones(9, np.int32))


# ------------------------------------------------------------ host.batches against the replaced graph


TASK_CASES = {
    "demo: addition, 6 per row": ["data.task=addition", "data.difficulty=2", "data.seq_len=64", "train.batch_size=32"],
    "pointer_chase: one per row (2 x 28 > 48)": [],
    "parity, 3 per row": ["data.task=parity", "data.difficulty=9", "data.seq_len=40"],
    "pack=false": ["data.task=parity", "data.difficulty=9", "data.seq_len=40", "data.pack=false"],
}


@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_task_batches_equal_the_replaced_graph(case):
    cfg = make_cfg(*TASK_CASES[case])
    new, legacy = both_graphs(cfg, task_docs(cfg))
    assert_batches_equal(take(iter(new), 6), take(iter(legacy), 6))


def test_finite_epochs_end_alike_with_a_short_last_batch():
    cfg = make_cfg("data.task=parity", "data.difficulty=9", "data.seq_len=40", "data.num_epochs=2")
    new, legacy = both_graphs(cfg, task_docs(cfg, n=61))  # 122 examples at 3 per row, 8 rows: 5 batches + a part
    got = take(iter(new))
    assert_batches_equal(got, take(iter(legacy)))
    assert len(got) == math.ceil(122 / 24) and (got[-1]["segment_ids"][-1] == 0).all()


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.seq_len=24", "data.num_epochs=2"],  # documents split into pieces; rows of several pieces
        ["data.seq_len=320", "data.num_epochs=2", "train.batch_size=4"],  # no document is split
        ["data.seq_len=24", "data.num_epochs=1", "data.pack=false"],  # one piece per row
        ["data.seq_len=24", "data.num_epochs=1", "data.shuffle=false"],
    ],
)
def test_text_batches_equal_the_replaced_graph(corpus, overrides):
    cfg = text_cfg(corpus, *overrides)
    new, legacy = both_graphs(cfg, text_docs(corpus))
    got = take(iter(new))
    assert len(got) >= 2
    assert_batches_equal(got, take(iter(legacy)))


@pytest.mark.parametrize("process_index", [0, 2])
def test_process_slices_equal_the_replaced_graph(corpus, process_index):
    cfg = text_cfg(corpus, "data.seq_len=24", "data.num_epochs=1", "train.batch_size=6")
    new, legacy = both_graphs(cfg, text_docs(corpus), process_index=process_index, process_count=3)
    assert_batches_equal(take(iter(new)), take(iter(legacy)))


def test_worker_slices_equal_the_replaced_graph(corpus):
    """grain's worker prefetch calls set_slice: worker i must pack documents i::workers, as before."""
    cfg = text_cfg(corpus, "data.seq_len=24", "data.num_epochs=1")
    for i in range(2):
        new, _ = both_graphs(cfg, text_docs(corpus))
        docs = new.parents[0]
        new.set_slice(slice(i, None, 2))
        legacy = legacy_graph(docs.slice(slice(i, None, 2)), n_rows=8, seq_len=24, chunk=True, one_per_row=False)
        assert_batches_equal(take(iter(new)), take(iter(legacy)))


def test_worker_processes_give_the_sliced_batches_and_resume(corpus):
    """data.worker_count=2: grain interleaves each worker's batches, packed from its own slice; resume is exact."""
    cfg = text_cfg(corpus, "data.seq_len=24", "data.worker_count=2")
    per_worker = []
    for i in range(2):
        new, _ = both_graphs(cfg, text_docs(corpus))
        new.set_slice(slice(i, None, 2))
        per_worker.append(take(iter(new), 4))
    want = [per_worker[k % 2][k // 2] for k in range(8)]
    it = pipeline.build_train_iterator(cfg)
    try:
        head = take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        tail = take(it, 3)
    finally:
        it.close()
    assert_batches_equal(head + tail, want)
    fresh = pipeline.build_train_iterator(cfg)
    try:
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 3), tail)
    finally:
        fresh.close()


# ------------------------------------------------------------ resume


def resume_cases(corpus):
    return {
        "task packed": make_cfg("data.task=parity", "data.difficulty=9", "data.seq_len=40", "data.num_epochs=2"),
        "text split": text_cfg(corpus, "data.seq_len=24", "data.num_epochs=2"),
        "text pack=false": text_cfg(corpus, "data.seq_len=24", "data.num_epochs=1", "data.pack=false"),
    }


@pytest.mark.parametrize("case", ["task packed", "text split", "text pack=false"])
def test_resume_at_every_batch(corpus, case, task_epoch):
    task_epoch(61)
    cfg = resume_cases(corpus)[case]
    full = take(pipeline.build_train_iterator(cfg))
    pieces_inside, states = 0, []
    for n in range(len(full) + 1):
        it = pipeline.build_train_iterator(cfg)
        head = take(it, n) if n else []  # take(it, 0) would drain it
        state = json.loads(json.dumps(it.get_state()))
        pieces_inside += state["piece"] > 0
        fresh = pipeline.build_train_iterator(cfg)
        fresh.set_state(state)
        assert_batches_equal(head + take(fresh), full)
        states.append(state)
    rewound = pipeline.build_train_iterator(cfg)
    take(rewound, 3)  # one iterator, moved back and forth: what it holds must not leak into the next batches
    for n in (len(full) // 2, 1, len(full) - 1):
        rewound.set_state(states[n])
        assert_batches_equal(take(rewound), full[n:])
    if cfg.data.source == "text":
        assert pieces_inside  # some batches end inside a split document


@pytest.mark.parametrize("case", ["task packed", "text split", "text pack=false"])
def test_states_of_the_replaced_graph_resume_exactly(corpus, case):
    """A checkpoint written before this packer resumes on it with the batches the old graph would have given."""
    cfg = resume_cases(corpus)[case]
    docs = task_docs(cfg, n=61) if cfg.data.source == "task" else text_docs(corpus)
    new, legacy = both_graphs(cfg, docs)
    full = take(iter(legacy))
    for n in range(len(full) + 1):
        old_it = iter(legacy)
        if n:
            take(old_it, n)
        state = json.loads(json.dumps(old_it.get_state()))
        new_it = iter(new)
        new_it.set_state(state)
        assert_batches_equal(take(new_it), full[n:])


@pytest.mark.parametrize(
    "state, error",
    [
        ({"doc": 10**9, "piece": 0}, IndexError),  # past the end of a finite stream
        ({"doc": 0, "piece": -1}, IndexError),
        ({"parent": {"next_index": 0}, "next_row": 3, "counter": 3}, ValueError),  # inside a packed batch
        ({"not": "a data state"}, KeyError),
    ],
)
def test_foreign_states_raise_what_the_trainer_refuses(corpus, state, error):
    """asura.train.trainer turns KeyError/ValueError/TypeError/IndexError from set_state into a one-line refusal."""
    it = pipeline.build_train_iterator(text_cfg(corpus, "data.seq_len=24", "data.num_epochs=1"))
    with pytest.raises(error):
        it.set_state(state)


@pytest.fixture
def task_epoch(monkeypatch):
    return lambda n: monkeypatch.setattr(sources, "TASK_EPOCH", n)
