"""grain stage: random-access documents -> [B, T] batches, packed with asura.data.packing.FirstFit.

    docs (grain MapDataset, index -> {"tokens": int32 [L], "scored": int32 [L]})
      -> pieces: document i split into seq_len pieces (when chunk=True; else one piece, itself)
      -> FirstFit: n_rows rows per batch, first fit in stream order (or one piece per row)
      -> next() returns one batch of model fields

The documents are read by index, so this stage has no parent iterator and its state is where
the stream stands: ``{"doc": i, "piece": j}``, the first piece not yet in a returned batch.
set_state() forgets the document in hand and packs from there: the same batches follow as in
an uninterrupted run. States written by the grain FirstFitPackIterDataset graph this replaced
(and by its pack=false graph) name the same place and are read too.

With data.worker_count > 0, grain's multiprocess prefetch gives worker i the documents
i::workers (set_slice, as its to_iter_dataset did in the graph this replaced); each worker
packs its own batches and grain interleaves them. Imports grain: only
asura.data.host imports this module, after checking that grain is installed.
"""

from __future__ import annotations

from typing import Any

import grain

from asura.data.packing import FirstFit
from asura.data.text import chunk


class PackedBatches(grain.IterDataset):
    """IterDataset of packed batches over a MapDataset of documents (see the module docstring)."""

    def __init__(self, docs: grain.MapDataset, *, n_rows: int, seq_len: int, chunk: bool, one_per_row: bool):
        super().__init__(docs)
        self.n_rows, self.seq_len, self.chunk, self.one_per_row = n_rows, seq_len, chunk, one_per_row

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's worker prefetch: worker i packs documents i::workers, as grain's to_iter_dataset did."""
        if sequential_slice:
            raise ValueError("PackedBatches slices its documents with a stride, not sequentially")
        self._parents = (self.parents[0].slice(sl),)

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self)

    def __str__(self) -> str:
        return f"PackedBatches(n_rows={self.n_rows}, seq_len={self.seq_len}, one_per_row={self.one_per_row})"


class PackedBatchIterator(grain.DatasetIterator):
    """next(): one batch; get_state()/set_state(): {"doc": i, "piece": j} (see the module docstring)."""

    def __init__(self, ds: PackedBatches):
        super().__init__()
        self._docs = ds.parents[0]  # read after grain's worker slicing, which happens before iter()
        self._n_docs = len(self._docs)
        self._seq_len, self._chunk = ds.seq_len, ds.chunk
        self._packer = FirstFit(ds.n_rows, ds.seq_len, max_per_row=1 if ds.one_per_row else None)
        self._doc = self._piece = 0
        self._pieces: list | None = None  # the pieces of document self._doc, once read

    def _read(self, i: int) -> list[tuple[Any, Any]]:
        doc = self._docs[i]
        tokens_L, scored_L = doc["tokens"], doc["scored"]
        if not self._chunk:
            return [(tokens_L, scored_L)]
        return list(zip(chunk(tokens_L, self._seq_len), chunk(scored_L, self._seq_len)))  # empty: no pieces

    def __next__(self) -> dict:
        packer = self._packer
        while self._doc < self._n_docs:
            if self._pieces is None:
                self._pieces = self._read(self._doc)
            if self._piece < len(self._pieces):
                if not packer.add(*self._pieces[self._piece]):
                    break  # the batch is full; this piece starts the next one
                self._piece += 1
            if self._piece >= len(self._pieces):
                self._doc, self._piece, self._pieces = self._doc + 1, 0, None
        if not len(packer):
            raise StopIteration
        return packer.take()

    def get_state(self) -> dict[str, int]:
        return {"doc": self._doc, "piece": self._piece}

    def set_state(self, state: dict[str, Any]) -> None:
        doc, piece = _read_state(state)
        if not (0 <= doc <= self._n_docs and piece >= 0):
            raise IndexError(f"data-iterator state {state} is outside the {self._n_docs} documents")
        self._doc, self._piece, self._pieces = doc, piece, None  # the packer is empty between batches

    def __str__(self) -> str:
        return "PackedBatchIterator"


def _read_state(state: dict[str, Any]) -> tuple[int, int]:
    """(doc, piece) from this stage's state or from one the replaced grain graph wrote.

    That graph saved, between batches: packed, {"parent": P, "next_row": 0, "counter": c}; unpacked,
    P itself; P is {"next_index": doc} or, when documents were chunked, the FlatMap state
    {"parent": {"next_index": doc}, "next_index_in_buffer": piece}.
    """
    if "doc" in state:
        return int(state["doc"]), int(state["piece"])
    if "next_row" in state:
        if state["next_row"] != 0:  # batches always ended with a packed batch, so this is someone else's state
            raise ValueError(f"data-iterator state stops inside a packed batch (next_row={state['next_row']})")
        state = state["parent"]
    if "next_index_in_buffer" in state:
        return int(state["parent"]["next_index"]), int(state["next_index_in_buffer"])
    return int(state["next_index"]), 0
