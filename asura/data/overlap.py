"""How much of a text corpus's eval split also occurs, verbatim, in its training split.

Held-out documents are not held-out text: licence headers, boilerplate and repeated idioms occur
in both splits, and a model that memorised them scores well on them without generalising. So
`asura.data.prepare` measures it and records it in metadata.json (``eval_overlap``):

    eval_windows   every window of WINDOW consecutive tokens inside an eval document (stride 1)
    in_train       how many of them occur somewhere inside a training document
    fraction       in_train / eval_windows

Windows are compared by a 64-bit polynomial hash of their tokens (two different windows collide
with probability ~2^-64 each: nothing at corpus sizes). Memory is the eval split's hashes; the
training shards are read back once.
"""

from __future__ import annotations

import glob
import os

import numpy as np

WINDOW = 32  # tokens: on bytes, about half a line of code or prose
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so every power is a unit mod 2^64


def window_hashes(ids_L: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """uint64 [max(L - window + 1, 0)]: one hash per window of `window` consecutive tokens."""
    ids_L = np.asarray(ids_L)
    if len(ids_L) < window:
        return np.zeros(0, np.uint64)
    powers_W = np.cumprod(np.full(window, _BASE, np.uint64), dtype=np.uint64)  # wraps mod 2^64, as meant
    windows_NW = np.lib.stride_tricks.sliding_window_view(ids_L.astype(np.uint64) + np.uint64(1), window)
    with np.errstate(over="ignore"):
        return (windows_NW * powers_W).sum(axis=1, dtype=np.uint64)


def _records(paths: list[str]):
    from array_record.python.array_record_module import ArrayRecordReader

    from asura.data.text import decode_record

    for path in paths:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
        try:
            n = reader.num_records()
            for start in range(0, n, 256):
                for record in reader.read(list(range(start, min(start + 256, n)))):
                    yield decode_record(record)
        finally:
            reader.close()


def eval_overlap(directory: str, window: int = WINDOW) -> dict:
    """The overlap of a prepared corpus's eval windows with its training documents."""
    shards = lambda split: sorted(glob.glob(os.path.join(directory, f"{split}-*.array_record")))
    parts = [window_hashes(ids, window) for ids in _records(shards("eval"))]
    eval_N = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    keys = np.unique(eval_N)
    found = np.zeros(len(keys), bool)
    for ids in _records(shards("train")):
        h = window_hashes(ids, window)
        if len(h):
            at = np.searchsorted(keys, h).clip(max=max(len(keys) - 1, 0))
            hit = keys[at] == h if len(keys) else np.zeros(len(h), bool)
            found[at[hit]] = True
    in_train = int(found[np.searchsorted(keys, eval_N)].sum()) if len(eval_N) else 0
    return {
        "window": window,
        "eval_windows": len(eval_N),
        "in_train": in_train,
        "fraction": in_train / len(eval_N) if len(eval_N) else 0.0,
    }
