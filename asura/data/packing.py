"""Row layout shared by every source: pure numpy, no grain.

A *row* is seq_len tokens holding one or more documents (segments numbered
from 1; 0 = padding). The model sees ``inputs = tokens`` and predicts
``targets[t] = tokens[t + 1]``; a target only counts when t and t + 1 belong to
the same segment, so targets never cross a document boundary and a document's
last token (and all padding) has loss_mask 0. ``scored`` marks which tokens
may be targets (all of them for text, only the answer for tasks).
"""

from __future__ import annotations

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def single_row(tokens_L: np.ndarray, scored_L: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One document padded to seq_len (the pack=False path); same keys as a packed row."""
    n = len(tokens_L)
    if n > seq_len:
        raise ValueError(f"document of {n} tokens does not fit data.seq_len={seq_len}")
    tokens_T = np.zeros(seq_len, np.int32)
    scored_T = np.zeros(seq_len, np.int32)
    seg_T = np.zeros(seq_len, np.int32)
    pos_T = np.zeros(seq_len, np.int32)
    tokens_T[:n], scored_T[:n], seg_T[:n], pos_T[:n] = tokens_L, scored_L, 1, np.arange(n)
    return {"tokens": tokens_T, "scored": scored_T, "tokens_segment_ids": seg_T, "tokens_positions": pos_T}


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


def batch_rows(rows: list[dict[str, np.ndarray]], n_rows: int) -> dict[str, np.ndarray]:
    """Stack packed rows into [B, T] model fields; a short final batch gets empty rows (segment 0, loss 0)."""
    packed = {}
    for k in _PACKED:
        x_BT = np.stack([r[k] for r in rows])
        if len(rows) < n_rows:
            x_BT = np.concatenate([x_BT, np.zeros((n_rows - len(rows), x_BT.shape[1]), x_BT.dtype)])
        packed[k] = x_BT
    return model_fields(packed)


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
