"""Row layout shared by every source, and the packer that fills rows: pure numpy, no grain.

A *row* is seq_len tokens holding one or more documents (segments numbered
from 1; 0 = padding). The model sees ``inputs = tokens`` and predicts
``targets[t] = tokens[t + 1]``; a target only counts when t and t + 1 belong to
the same segment, so targets never cross a document boundary and a document's
last token (and all padding) has loss_mask 0. ``scored`` marks which tokens
may be targets (all of them for text, only the answer for tasks).

    pieces (each <= seq_len tokens), in stream order
      -> FirstFit.add: choose a row (a few numpy calls on per-row counters: no per-token work)
      -> FirstFit.take: one vectorised scatter into [B, T], then model_fields

FirstFit reproduces grain's FirstFitPackIterDataset (shuffle_bins=False) followed by
batching its rows: the same rows in the same order, segment ids and positions included
(tests/test_data_packing.py holds grain's packer as the oracle). Keep that equality: a
checkpointed iterator state names a place in the document stream, and resuming must
rebuild the same batches.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


_PACKED = ("tokens", "scored", "tokens_segment_ids", "tokens_positions")


def _shift_left(x_BT: np.ndarray) -> np.ndarray:
    return np.concatenate([x_BT[..., 1:], np.zeros_like(x_BT[..., :1])], axis=-1)


def model_fields(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed/padded rows (grain FirstFitPack keys, [..., T]) -> the model's five fields."""
    tokens_BT = packed["tokens"].astype(np.int32)
    seg_BT = packed["tokens_segment_ids"].astype(np.int32)
    same_doc_BT = (seg_BT > 0) & (_shift_left(seg_BT) == seg_BT)
    return {
        "inputs": tokens_BT,
        "targets": np.where(same_doc_BT, _shift_left(tokens_BT), 0).astype(np.int32),
        "loss_mask": (same_doc_BT & (_shift_left(packed["scored"]) > 0)).astype(np.float32),
        "segment_ids": seg_BT,
        "positions": np.where(seg_BT > 0, packed["tokens_positions"], 0).astype(np.int32),
    }


def exact_match(pred_BT, batch: dict) -> tuple[int, int]:
    """(n_correct, n_examples) over the examples in a batch.

    An example is one (row, segment) with at least one scored target; it is
    correct when every scored target is predicted exactly. ``pred_BT`` is the
    argmax token at each position (a prediction of ``targets``); rows may hold
    several packed examples, so this counts examples, not rows.
    """
    pred_BT = np.asarray(pred_BT)
    seg_BT = np.asarray(batch["segment_ids"]).astype(np.int64)
    mask_BT = np.asarray(batch["loss_mask"]) > 0
    wrong_BT = mask_BT & (pred_BT != np.asarray(batch["targets"]))
    b, t = seg_BT.shape
    key_BT = np.arange(b)[:, None] * (t + 1) + seg_BT  # unique id per (row, segment)
    n_keys = b * (t + 1)
    has_answer = np.bincount(key_BT[mask_BT], minlength=n_keys) > 0
    has_wrong = np.bincount(key_BT[wrong_BT], minlength=n_keys) > 0
    return int((has_answer & ~has_wrong).sum()), int(has_answer.sum())


class FirstFit:
    """First-fit packing of pieces into ``n_rows`` rows of ``seq_len`` tokens: one batch at a time.

    ``add`` puts a piece into the first row with room for it (and, with ``max_per_row``, fewer than
    that many pieces) and returns True; it returns False, adding nothing, when no row has room: the
    batch is then complete and the piece starts the next one. ``take`` returns the batch as model
    fields [n_rows, seq_len] (rows never used are empty: segment 0, loss 0) and starts a new batch.
    ``max_per_row=1`` is the unpacked layout: piece k of a batch alone in row k.

    A piece of 0 tokens still takes a row's next segment id and counts as its content, as in grain.
    """

    def __init__(self, n_rows: int, seq_len: int, max_per_row: int | None = None):
        self.n_rows, self.seq_len, self.max_per_row = n_rows, seq_len, max_per_row
        self._reset()

    def _reset(self) -> None:
        self._free = np.full(self.n_rows, self.seq_len, np.int64)  # room left per row
        self._count = np.zeros(self.n_rows, np.int64)  # pieces per row, so also its last segment id
        self._used = 0  # rows holding a piece: always a prefix, since an empty row fits any piece
        self._tokens, self._scored = [], []  # the pieces, in the order they were added
        self._dest = []  # flat index row * seq_len + start of each piece
        self._seg = []

    def __len__(self) -> int:
        """Pieces in the current batch."""
        return len(self._tokens)

    def add(self, tokens_L: np.ndarray, scored_L: np.ndarray) -> bool:
        n = len(tokens_L)
        if n > self.seq_len:
            raise ValueError(f"a piece of {n} tokens does not fit data.seq_len={self.seq_len}")
        end = min(self._used + 1, self.n_rows)  # the rows past self._used are empty and alike: look at one
        ok = self._free[:end] >= n
        if self.max_per_row is not None:
            ok &= self._count[:end] < self.max_per_row
        row = int(ok.argmax())
        if not ok[row]:
            return False
        self._dest.append(row * self.seq_len + self.seq_len - int(self._free[row]))
        self._free[row] -= n
        self._count[row] += 1
        self._seg.append(int(self._count[row]))
        self._used = max(self._used, row + 1)
        self._tokens.append(tokens_L)
        self._scored.append(scored_L)
        return True

    def take(self) -> dict[str, np.ndarray]:
        """The batch as model fields [n_rows, seq_len]; the packer is empty afterwards."""
        b, t = self.n_rows, self.seq_len
        lengths = np.fromiter(map(len, self._tokens), np.int64, len(self._tokens))
        total = int(lengths.sum())
        first = np.cumsum(lengths) - lengths  # each piece's offset in the concatenation
        pos = np.arange(total, dtype=np.int64) - np.repeat(first, lengths)  # position inside its piece
        dest = np.repeat(np.asarray(self._dest, np.int64), lengths) + pos
        packed = {k: np.zeros(b * t, np.int32) for k in _PACKED}
        if total:
            packed["tokens"][dest] = np.concatenate(self._tokens)
            packed["scored"][dest] = np.concatenate(self._scored)
            packed["tokens_segment_ids"][dest] = np.repeat(np.asarray(self._seg, np.int32), lengths)
            packed["tokens_positions"][dest] = pos
        self._reset()
        return model_fields({k: v.reshape(b, t) for k, v in packed.items()})
