"""Task-source pipeline: determinism, exact resume, packing invariants, per-process slicing, metrics."""

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from asura.config.load import load_config
from asura.data import pipeline, sources, tasks
from asura.data.packing import FIELDS

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def make_cfg(*overrides):
    # Pinned task settings: the tests must not move when configs/demo.yaml is retuned.
    pinned = ["data.task=pointer_chase", "data.difficulty=3", "data.seq_len=48", "model.max_iterations=3"]
    return load_config(DEMO, ["train.batch_size=8", *pinned, *overrides])


@pytest.fixture
def task_epoch(monkeypatch):
    """set(n): a task "epoch" of n examples, so finite-epoch tests end quickly."""
    return lambda n: monkeypatch.setattr(sources, "TASK_EPOCH", n)


def take(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def segments(batches):
    """Every (row, segment) of every batch as a byte string of its input tokens."""
    out = []
    for b in batches:
        for inp_T, seg_T in zip(b["inputs"], b["segment_ids"]):
            for s in range(1, seg_T.max() + 1):
                out.append(bytes(inp_T[seg_T == s].astype(np.uint8)))
    return out


def expected_examples(cfg, n, stream=tasks.TRAIN_STREAM, difficulty=None):
    task = tasks.get_task(cfg.data.task)
    d = difficulty or cfg.data.difficulty
    return [tasks.make_example(task, d, cfg.train.seed, stream, i).text.encode() for i in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_row_invariants(batch):
    for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)]:
        assert batch[k].dtype == dtype, k
    assert batch["segment_ids"].dtype == np.int32 and batch["positions"].dtype == np.int32
    for inp, tgt, mask, seg, pos in zip(*(batch[k] for k in FIELDS)):
        n_seg = seg.max()
        real = seg > 0
        assert (np.diff(seg[real]) >= 0).all() and set(seg[real]) == set(range(1, n_seg + 1))
        assert (~real[np.argmax(~real) :]).all() if (~real).any() else True  # padding only at the end
        assert (mask[~real] == 0).all() and (inp[~real] == 0).all() and (pos[~real] == 0).all()
        for s in range(1, n_seg + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions reset per document
            np.testing.assert_array_equal(tgt[idx[:-1]], inp[idx[1:]])  # next token inside the document
            assert mask[idx[-1]] == 0 and tgt[idx[-1]] == 0  # never predict across a boundary


def test_determinism_and_seed_sensitivity():
    cfg = make_cfg()
    a, b = take(pipeline.build_train_iterator(cfg), 4), take(pipeline.build_train_iterator(cfg), 4)
    assert_batches_equal(a, b)
    c = take(pipeline.build_train_iterator(make_cfg("train.seed=1")), 4)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


@pytest.mark.parametrize("pack", [True, False])
def test_exact_resume_across_epochs(pack, task_epoch):
    task_epoch(30)
    cfg = make_cfg("data.num_epochs=3", "data.shuffle=true", f"data.pack={str(pack).lower()}")
    full = take(pipeline.build_train_iterator(cfg))
    assert 9 <= len(full) <= 14  # 3 epochs of 30 examples, 8 rows per batch, finite
    for n in (1, 5, len(full) - 1):
        it = pipeline.build_train_iterator(cfg)
        head = take(it, n)
        state = json.loads(json.dumps(it.get_state()))  # must be JSON-serialisable
        fresh = pipeline.build_train_iterator(cfg)
        fresh.set_state(state)
        assert_batches_equal(head + take(fresh), full)


def test_epoch_packs_every_example_exactly_once_and_reshuffles(task_epoch):
    task_epoch(64)
    cfg = make_cfg("data.num_epochs=2", "data.difficulty=1", "data.seq_len=40")  # 12-token examples, 3 per row
    batches = take(pipeline.build_train_iterator(cfg))
    for b in batches:
        check_row_invariants(b)
    got = segments(batches)
    want = expected_examples(cfg, 64)
    assert collections.Counter(got) == collections.Counter(want * 2)
    assert max(b["segment_ids"].max() for b in batches) == 3  # several examples share a row
    first_epoch = got[:64]
    assert first_epoch != want and sorted(first_epoch) == sorted(want)  # shuffled, and epoch 1 is complete


def test_loss_mask_scores_only_answers():
    cfg = make_cfg()
    batch = take(pipeline.build_train_iterator(cfg), 1)[0]
    check_row_invariants(batch)
    for inp, tgt, mask, seg in zip(batch["inputs"], batch["targets"], batch["loss_mask"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            text = bytes(inp[idx].astype(np.uint8)).decode()
            scored = bytes(tgt[idx][mask[idx] > 0].astype(np.uint8)).decode()
            assert scored == text.split("?")[1]  # "7\n": the answer and the newline


def test_process_slices_disjoint_and_covering(task_epoch):
    task_epoch(45)
    cfg = make_cfg("data.num_epochs=1", "train.batch_size=6")
    per_proc = [segments(take(pipeline.build_train_iterator(cfg, process_index=i, process_count=3))) for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(per_proc[i]) & set(per_proc[j])
    assert collections.Counter([s for p in per_proc for s in p]) == collections.Counter(expected_examples(cfg, 45))
    batch = next(pipeline.build_train_iterator(cfg, process_index=1, process_count=3))
    assert batch["inputs"].shape == (2, cfg.data.seq_len)


def test_exact_match_counts_examples_not_rows():
    cfg = make_cfg("data.difficulty=1", "data.seq_len=40")
    batch = take(pipeline.build_train_iterator(cfg), 1)[0]
    n = len(segments([batch]))
    assert n > batch["inputs"].shape[0]
    pred = batch["targets"].copy()
    assert pipeline.exact_match(pred, batch) == (n, n)
    r, t = np.argwhere(batch["loss_mask"] > 0)[0]
    pred[r, t] += 1
    assert pipeline.exact_match(pred, batch) == (n - 1, n)
    pred[batch["loss_mask"] == 0] = 99  # unscored positions never matter
    assert pipeline.exact_match(pred, batch) == (n - 1, n)


def test_eval_set_deterministic_disjoint_and_harder():
    cfg = make_cfg("data.eval_difficulty=5")
    ev = pipeline.build_eval_batches(cfg, 2)
    assert len(ev) == 2
    assert_batches_equal(ev, pipeline.build_eval_batches(cfg, 2))
    got = segments(ev)
    assert got[:3] == expected_examples(cfg, 3, tasks.EVAL_STREAM, difficulty=5)
    train = set(segments(take(pipeline.build_train_iterator(cfg), 4)))
    assert not train & set(got)
    easy = segments(pipeline.build_eval_batches(cfg, 1, difficulty=2))
    assert len(easy[0]) == tasks.get_task("pointer_chase").max_len(2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.task=nope"], "unknown data.task 'nope'; valid: addition, addition_lsb, modular_arith"),
        (["data.difficulty=6"], "needs 52 tokens per example but data.seq_len=48"),
        (["data.eval_difficulty=9"], "data.eval_difficulty=9 needs 76 tokens"),
        (["model.vocab_size=100"], "data needs vocab_size >= 128 .* model.vocab_size=100"),
    ],
)
def test_check_compatible_errors(overrides, match):
    cfg = make_cfg(*overrides)
    with pytest.raises(ValueError, match=match):
        pipeline.check_compatible(cfg)


def test_check_compatible_batch_split_and_source():
    cfg = make_cfg()
    pipeline.check_compatible(cfg)
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by process_count=3"):
        pipeline.check_compatible(cfg, process_count=3)
    bad = cfg.replace(data=dataclasses.replace(cfg.data, source="video"))
    with pytest.raises(ValueError, match=r"data.source='video' is not valid; choose one of task, text, synthetic"):
        pipeline.check_compatible(bad)
    with pytest.raises(ValueError, match=r"process_index=4 must be in \[0, process_count=4\)"):
        pipeline.build_train_iterator(cfg, process_index=4, process_count=4)


def test_synthetic_batch_on_device():
    import jax

    cfg = make_cfg("data.source=synthetic")
    assert pipeline.data_vocab_size(cfg) == cfg.model.vocab_size
    pipeline.check_compatible(cfg)
    b0 = pipeline.synthetic_batch(cfg, 0)
    jitted = jax.jit(lambda s: pipeline.synthetic_batch(cfg, s))(0)
    assert b0["inputs"].shape == (8, 48) and b0["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b0["inputs"], jitted["inputs"])
    assert not np.array_equal(b0["inputs"], pipeline.synthetic_batch(cfg, 1)["inputs"])
    check_row_invariants({k: np.asarray(v) for k, v in b0.items()})
