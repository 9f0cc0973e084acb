"""Data: embedded reasoning tasks, tokenised real text, and a synthetic mode; one API for all three.

  asura.data.sources    SOURCES registry (data.source = task | text | synthetic), each entry carrying its facts
  asura.data.pipeline   check_compatible, data_vocab_size, build_train_iterator, build_eval_batches, exact_match
  asura.data.host       the grain graph shared by task and text: documents -> ... -> [B, T] batches
  asura.data.grain_pack the grain stage that packs documents into batches (packing.FirstFit), resumable
  asura.data.packing    row layout (segments, targets, loss mask) and the first-fit packer; pure numpy
  asura.data.tasks      task registry (pointer_chase, addition, parity, reverse, modular_arith); pure numpy
  asura.data.text       reading prepared shards: resolve_shards, probe_shards
  asura.data.prepare    CLI: text files / jsonl / Hugging Face datasets -> ArrayRecord token shards
  asura.data.synthetic  synthetic_batch(cfg, step): jax.random batches, no files

The pipeline's functions are attributes of this package too (``asura.data.build_train_iterator``),
loaded on first use so that ``import asura.data.sources`` stays pure python. Nothing here imports
grain or JAX at import time (the GPU image lacks grain).

Offline real-text default: ``python -m asura.data.prepare --builtin pydoc --output data/pydoc``
(Python's own help topics), then ``data.source=text data.path=data/pydoc``.
"""

from __future__ import annotations

import importlib

_API = {
    "check_compatible": "pipeline",
    "data_vocab_size": "pipeline",
    "build_train_iterator": "pipeline",
    "build_eval_batches": "pipeline",
    "exact_match": "pipeline",
    "synthetic_batch": "pipeline",
    "SOURCES": "sources",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'asura.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"asura.data.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_API))
