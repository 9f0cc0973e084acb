"""Host input pipeline (grain), shared by the task and text sources.

    Documents (random-access records)
      -> shuffle -> per-process slice -> repeat (epochs) -> to_doc      grain MapDataset
      -> split documents longer than seq_len into pieces
      -> first-fit pack (or one piece per row) -> batch [B, T]           asura.data.grain_pack
      -> prefetch (a thread, or grain worker processes)

A source only supplies its `Documents` (task_documents, text_documents); everything
after that is the same graph. Invariants a contributor must keep:
  - each epoch is sliced across processes *before* repeat, so processes see disjoint
    documents and together cover every one of them once per epoch;
  - the records are random access and every stage is deterministic, so get_state()
    is JSON (where the document stream stands) and set_state() resumes bit-exactly;
  - element functions are module-level (not lambdas): grain worker processes pickle them.

The packer reads documents by index and packs them with numpy (asura.data.packing.FirstFit):
the rows grain's FirstFitPackIterDataset gave, for about a tenth of its CPU per batch.
This module and asura.data.grain_pack are the only ones that import grain, and only when a
pipeline is built: the GPU image lacks grain, and the synthetic source must work without it.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from asura.data import tasks as tasks_lib
from asura.data import text as text_lib

_SHUFFLE_SALT = 0x5EED  # keeps the shuffle seed independent of the example-generation seed


class Documents(NamedTuple):
    records: Any  # grain MapDataset; random access, so shuffling and resume are exact
    to_doc: Callable[[Any], dict]  # record -> {"tokens": int32 [L], "scored": int32 [L]}
    max_doc_tokens: int
    fixed_len: bool  # every document has max_doc_tokens tokens: if two cannot share a row, packing == padding


def grain():
    try:
        import grain
    except ImportError:
        raise ImportError(
            "data.source=task|text needs the `grain` package (pip install grain); use data.source=synthetic without it"
        ) from None
    return grain


# ------------------------------------------------------------ documents


def _task_doc(index, *, task, difficulty, seed, stream, held_out, min_difficulty):
    ex = tasks_lib.make_example(task, difficulty, seed, stream, index, held_out, min_difficulty)
    tokens_L, answer_L = ex.encode()
    return {"tokens": tokens_L, "scored": answer_L.astype(np.int32)}


def task_documents(cfg, *, stream: int, difficulty: int, n_examples: int, min_difficulty: int = 0) -> Documents:
    """Examples 0..n_examples-1 of one seed stream; tasks are generated per index, so any n works.
    ``min_difficulty`` > 0 draws each example's difficulty from min_difficulty..difficulty."""
    task = tasks_lib.get_task(cfg.data.task)
    tasks_lib.check_fits(task, difficulty, cfg.data.seq_len)
    ranged = 0 < min_difficulty < difficulty
    to_doc = functools.partial(
        _task_doc, task=task, difficulty=difficulty, seed=cfg.train.seed, stream=stream, held_out=cfg.data.held_out,
        min_difficulty=min_difficulty if ranged else 0,
    )  # fmt: skip
    return Documents(
        records=grain().MapDataset.range(n_examples),
        to_doc=to_doc,
        max_doc_tokens=task.max_len(difficulty),  # max_len grows with difficulty: the range's top bounds it
        fixed_len=not ranged,
    )


def _text_doc(record):
    tokens_L = text_lib.decode_record(record)
    return {"tokens": tokens_L, "scored": np.ones_like(tokens_L)}


def text_documents(shards: text_lib.Shards) -> Documents:
    g = grain()
    return Documents(
        records=g.MapDataset.source(g.sources.ArrayRecordDataSource(list(shards.paths))),
        to_doc=_text_doc,
        max_doc_tokens=shards.max_doc_tokens,
        fixed_len=False,
    )


# ------------------------------------------------------------ graph


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag and fail when the host script never parsed flags
    # (google/grain#1355); marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batches(cfg, docs: Documents, *, process_index: int, process_count: int, shuffle: bool, num_epochs: int):
    """The grain IterDataset of this process's [train.batch_size // process_count, seq_len] batches."""
    g, d = grain(), cfg.data
    from asura.data.grain_pack import PackedBatches

    ds = docs.records
    if shuffle:
        ds = ds.shuffle(seed=cfg.train.seed + _SHUFFLE_SALT)
    ds = ds[process_index::process_count]  # before repeat: each epoch is split disjointly and completely
    ds = ds.repeat(None if num_epochs == 0 else num_epochs)  # reshuffles every epoch
    ds = PackedBatches(
        ds.map(docs.to_doc),
        n_rows=cfg.train.batch_size // process_count,
        seq_len=d.seq_len,
        chunk=docs.max_doc_tokens > d.seq_len,
        # pack=false, or fixed-length documents no two of which fit a row (packing would only pad)
        one_per_row=not d.pack or (docs.fixed_len and 2 * docs.max_doc_tokens > d.seq_len),
    )
    if d.worker_count > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(g.MultiprocessingOptions(num_workers=d.worker_count))
    elif d.prefetch > 0:
        ds = g.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
    return ds


# ------------------------------------------------------------ iterators

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


def train_iterator(cfg, docs: Documents, *, process_index: int, process_count: int) -> BatchIterator:
    ds = batches(
        cfg,
        docs,
        process_index=process_index,
        process_count=process_count,
        shuffle=cfg.data.shuffle,
        num_epochs=cfg.data.num_epochs,
    )
    return BatchIterator(iter(ds))


def first_batches(cfg, docs: Documents, n_batches: int, *, process_index: int, process_count: int) -> list[dict]:
    """Up to n_batches from one unshuffled pass: a fixed eval set (fewer when the documents run out)."""
    ds = batches(cfg, docs, process_index=process_index, process_count=process_count, shuffle=False, num_epochs=1)
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
