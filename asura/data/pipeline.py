"""Host input pipeline: documents -> shuffle -> per-process slice -> epochs -> pack -> batch -> prefetch.

Public entry points for the train loop:
  check_compatible(cfg)                 raise one-line ValueErrors before any compilation
  data_vocab_size(cfg)                  vocabulary the data needs (<= model.vocab_size)
  build_train_iterator(cfg, ...)        checkpointable iterator of per-process numpy batches
  build_eval_batches(cfg, n, ...)       fixed eval set (disjoint seed stream)
  exact_match(pred_BT, batch)           (n_correct_examples, n_examples)
  synthetic_batch(cfg, step)            on-device random batch (asura.data.synthetic)

grain is imported lazily: the GPU image lacks it, and the synthetic mode and
the task generators must work without it.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import weakref

import numpy as np

from asura.data import tasks as tasks_lib
from asura.data import text as text_lib
from asura.data.packing import batch_rows, exact_match, single_row  # noqa: F401  (exact_match: re-export)
from asura.data.synthetic import synthetic_batch  # noqa: F401  (re-export)

TASK_EPOCH = 1 << 20  # examples per task "epoch": tasks are generated per index, so any size works
_SHUFFLE_SALT = 0x5EED  # keeps the shuffle seed independent of the example-generation seed


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
    for it in list(_LIVE_ITERATORS):
        it.close()


class BatchIterator:
    """Thin wrapper over grain's DatasetIterator: next(), get_state(), set_state(), close().

    Owning the grain iterator lets an atexit hook release it before interpreter teardown, where
    grain's prefetch-thread cleanup otherwise prints spurious tracebacks.
    """

    def __init__(self, it):
        self._it = it
        _LIVE_ITERATORS.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def _grain():
    try:
        import grain
    except ImportError:
        raise ImportError(
            "data.source=task|text needs the `grain` package (pip install grain); use data.source=synthetic without it"
        ) from None
    return grain


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag and fail when the host script never parsed flags
    # (google/grain#1355); marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _eval_difficulty(cfg, difficulty: int | None) -> int:
    return difficulty or cfg.data.eval_difficulty or cfg.data.difficulty


def data_vocab_size(cfg) -> int:
    """Token ids the data can contain: tasks are ASCII, text uses its tokenizer, synthetic uses the model's."""
    src = cfg.data.source
    if src == "task":
        return tasks_lib.get_task(cfg.data.task).vocab_size_needed
    if src == "text":
        return text_lib.resolve_shards(cfg.data.path).vocab_size
    if src == "synthetic":
        return cfg.model.vocab_size
    raise ValueError(f"unknown data.source {src!r}; valid: task, text, synthetic")


def _same_tokenizer(a: str, b: str) -> bool:
    # JSON tokenizers are named by path; the shards may have been prepared from another directory.
    return a == b or (a.endswith(".json") and os.path.basename(a) == os.path.basename(b))


def check_compatible(cfg, *, process_count: int = 1) -> None:
    """Validate the data against the model and the batch; every failure is a one-line ValueError."""
    d = cfg.data
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by process_count={process_count}")
    if d.source == "task":
        task = tasks_lib.get_task(d.task)
        tasks_lib.check_fits(task, d.difficulty, d.seq_len)
        if d.eval_difficulty:
            tasks_lib.check_fits(task, d.eval_difficulty, d.seq_len, what="data.eval_difficulty")
    elif d.source == "text":
        shards = text_lib.resolve_shards(d.path)
        if not _same_tokenizer(d.tokenizer, shards.tokenizer):
            raise ValueError(
                f"data.tokenizer={d.tokenizer!r} but the shards at {d.path!r} were tokenised with {shards.tokenizer!r}"
            )
        if not d.pack and shards.max_doc_tokens < d.seq_len:
            raise ValueError(
                f"data.seq_len={d.seq_len} but the longest document in {d.path!r} has {shards.max_doc_tokens} "
                "tokens and data.pack=false, so every row would be mostly padding; set data.pack=true or lower seq_len"
            )
    elif d.source != "synthetic":
        raise ValueError(f"unknown data.source {d.source!r}; valid: task, text, synthetic")
    need = data_vocab_size(cfg)
    if need > cfg.model.vocab_size:
        raise ValueError(f"data needs vocab_size >= {need} ({d.source}) but model.vocab_size={cfg.model.vocab_size}")


# ------------------------------------------------------------ element functions
# Module-level (not lambdas) so grain worker processes can pickle them.


def _task_doc(index, *, task, difficulty, seed, stream):
    tokens_L, answer_L = tasks_lib.make_example(task, difficulty, seed, stream, index).encode()
    return {"tokens": tokens_L, "scored": answer_L.astype(np.int32)}


def _text_doc(record):
    tokens_L = text_lib.decode_record(record)
    return {"tokens": tokens_L, "scored": np.ones_like(tokens_L)}


def _pad_doc(doc, *, seq_len):
    return single_row(doc["tokens"], doc["scored"], seq_len)


class _Chunker:
    """grain FlatMap (duck-typed, so it pickles for worker processes): a document -> seq_len pieces."""

    def __init__(self, seq_len: int, max_doc_tokens: int):
        self.seq_len = seq_len
        self.max_fan_out = max(1, math.ceil(max_doc_tokens / seq_len))

    def flat_map(self, doc):
        pieces = zip(text_lib.chunk(doc["tokens"], self.seq_len), text_lib.chunk(doc["scored"], self.seq_len))
        return [{"tokens": t, "scored": s} for t, s in pieces]


# ------------------------------------------------------------------ pipeline


def _build(cfg, *, split, process_index, process_count, shuffle, num_epochs, difficulty, n_rows, task_epoch):
    grain = _grain()
    d, seed = cfg.data, cfg.train.seed
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if d.source == "task":
        task = tasks_lib.get_task(d.task)
        tasks_lib.check_fits(task, difficulty, d.seq_len)
        stream = tasks_lib.TRAIN_STREAM if split == "train" else tasks_lib.EVAL_STREAM
        ds = grain.MapDataset.range(task_epoch)
        to_doc = functools.partial(_task_doc, task=task, difficulty=difficulty, seed=seed, stream=stream)
        max_doc = task.max_len(difficulty)
    elif d.source == "text":
        shards = text_lib.resolve_shards(d.path, split)
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shards.paths)))
        to_doc, max_doc = _text_doc, shards.max_doc_tokens
    else:
        raise ValueError(f"data.source={d.source!r} has no host pipeline; valid: task, text (synthetic is on-device)")
    if shuffle:
        ds = ds.shuffle(seed=seed + _SHUFFLE_SALT)
    ds = ds[process_index::process_count]  # before repeat: each epoch is split disjointly and completely
    ds = ds.repeat(None if num_epochs == 0 else num_epochs)  # reshuffles every epoch
    # Task examples are ~20us of numpy, cheaper than a thread hand-off; text reads benefit from threads.
    threads = 0 if d.source == "task" else 2
    ds = ds.map(to_doc).to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads * 8))
    if max_doc > d.seq_len:  # text only: tasks were checked to fit
        ds = grain.experimental.FlatMapIterDataset(ds, _Chunker(d.seq_len, max_doc))
    # Fixed-length task examples that cannot share a row pack exactly like padding; skip the packer's cost.
    pack = d.pack and not (d.source == "task" and 2 * max_doc > d.seq_len)
    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct={"tokens": d.seq_len, "scored": d.seq_len},
            num_packing_bins=n_rows,
            shuffle_bins=False,
        )
    else:
        ds = ds.map(functools.partial(_pad_doc, seq_len=d.seq_len))
    ds = ds.batch(n_rows, drop_remainder=False, batch_fn=functools.partial(batch_rows, n_rows=n_rows))
    if d.worker_count > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    elif d.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
    return ds


def build_train_iterator(
    cfg, *, process_index: int = 0, process_count: int = 1, task_epoch: int = TASK_EPOCH
) -> BatchIterator:
    """Iterator of this process's batches (train.batch_size // process_count rows each).

    Yields dicts of numpy arrays: inputs/targets/segment_ids/positions int32 [B, T], loss_mask float32 [B, T].
    Exposes get_state() (JSON-serialisable) and set_state(state) for exact resume. With
    data.num_epochs > 0 it stops after that many epochs; the final batch is padded with empty rows.
    """
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by process_count={process_count}")
    ds = _build(
        cfg,
        split="train",
        process_index=process_index,
        process_count=process_count,
        shuffle=cfg.data.shuffle,
        num_epochs=cfg.data.num_epochs,
        difficulty=cfg.data.difficulty,
        n_rows=cfg.train.batch_size // process_count,
        task_epoch=task_epoch,
    )
    return BatchIterator(iter(ds))


def build_eval_batches(
    cfg, n_batches: int, *, difficulty: int | None = None, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """Deterministic eval set: the task's eval seed stream (at eval difficulty) or the text eval shards.

    Text eval is one pass over the eval shards, so it may return fewer than n_batches.
    """
    ds = _build(
        cfg,
        split="eval",
        process_index=process_index,
        process_count=process_count,
        shuffle=False,
        num_epochs=1,
        difficulty=_eval_difficulty(cfg, difficulty),
        n_rows=cfg.train.batch_size // process_count,
        task_epoch=TASK_EPOCH,
    )
    out = []
    it = iter(ds)
    try:
        while len(out) < n_batches:
            out.append(next(it))
    except StopIteration:
        pass
    finally:
        it.close()
    return out
