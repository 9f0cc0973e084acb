"""Reading prepared token shards (written by ``python -m asura.data.prepare``).

A prepared directory holds ``train-*.array_record`` and ``eval-*.array_record``
(one record per document: little-endian int32 token ids) and ``metadata.json``
with the tokenizer, its vocab size and per-shard statistics. ``data.path`` may
be that directory (meaning its train shards) or a glob of shard files.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np

METADATA = "metadata.json"
FORMAT = "asura-tokens-v1"
TOKEN_DTYPE = np.dtype("<i4")


@dataclass(frozen=True)
class Shards:
    paths: tuple[str, ...]
    tokenizer: str
    vocab_size: int
    documents: int
    tokens: int
    max_doc_tokens: int


def decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=TOKEN_DTYPE).astype(np.int32)


def _read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise ValueError(f"no {METADATA} next to the shards in {directory!r}; write them with asura.data.prepare")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-run asura.data.prepare")
    return meta


def resolve_shards(path: str, split: str = "train") -> Shards:
    """Shard files for ``split`` plus merged metadata; raises one-line ValueErrors on bad paths."""
    if not path:
        raise ValueError("data.path is empty; point it at a directory or glob from `python -m asura.data.prepare`")
    if os.path.isdir(path):
        pattern = os.path.join(path, f"{split}-*.array_record")
    elif split == "train":
        pattern = path
    else:  # eval shards live next to the train shards the glob names
        train_dirs = {os.path.dirname(p) for p in glob.glob(path)}
        if not train_dirs:
            raise ValueError(f"data.path {path!r} matches no files; expected shards from asura.data.prepare")
        pattern = os.path.join(sorted(train_dirs)[0], f"{split}-*.array_record")
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"data.path {path!r} matches no {split} shards (looked for {pattern!r})")
    metas = {d: _read_metadata(d) for d in sorted({os.path.dirname(p) for p in paths})}
    tokenizers = {m["tokenizer"] for m in metas.values()}
    if len(tokenizers) > 1:
        raise ValueError(f"data.path {path!r} mixes shards from different tokenizers: {sorted(tokenizers)}")
    stats = []
    for p in paths:
        shard_stats = metas[os.path.dirname(p)]["shards"].get(os.path.basename(p))
        if shard_stats is None:
            raise ValueError(f"shard {p!r} is not listed in its {METADATA}; re-run asura.data.prepare")
        if os.path.getsize(p) == 0 or shard_stats["documents"] == 0:
            raise ValueError(f"shard {p!r} is empty")
        stats.append(shard_stats)
    return Shards(
        paths=tuple(paths),
        tokenizer=tokenizers.pop(),
        vocab_size=max(int(m["vocab_size"]) for m in metas.values()),
        documents=sum(s["documents"] for s in stats),
        tokens=sum(s["tokens"] for s in stats),
        max_doc_tokens=max(s["max_doc_tokens"] for s in stats),
    )


def chunk(tokens_L: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Split a document into pieces of at most seq_len tokens (no overlap, no token lost)."""
    return [tokens_L[i : i + seq_len] for i in range(0, len(tokens_L), seq_len)]
