"""The data API the train loop calls, the same for every ``data.source``.

  check_compatible(cfg)                 raise one-line ValueErrors before any compilation
  data_vocab_size(cfg)                  vocabulary the data needs (<= model.vocab_size)
  build_train_iterator(cfg, ...)        checkpointable iterator of per-process numpy batches
  build_eval_batches(cfg, n, ...)       fixed eval set, disjoint from training
  exact_match(pred_BT, batch)           (n_correct_examples, n_examples)
  synthetic_batch(cfg, step)            on-device random batch (asura.data.synthetic)

Each function checks what every source shares (the batch split across processes, data.tokenizer
only for sources that use one), then calls the source's entry in asura.data.sources. grain is
imported only by the task and text entries: the GPU image lacks it.
"""

from __future__ import annotations

import numpy as np

from asura.config.schema import DataConfig
from asura.data.packing import exact_match  # noqa: F401  (re-export)
from asura.data.sources import SOURCES
from asura.data.synthetic import synthetic_batch  # noqa: F401  (re-export)


def _check_split(cfg, process_index: int, process_count: int) -> None:
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


def data_vocab_size(cfg) -> int:
    """Token ids the data can contain: tasks are ASCII, text uses its tokenizer, synthetic uses the model's."""
    return SOURCES[cfg.data.source].vocab_size(cfg)


def check_compatible(cfg, *, process_count: int = 1) -> None:
    """Validate the data against the model and the batch; every failure is a one-line ValueError."""
    d = cfg.data
    source = SOURCES[d.source]
    _check_split(cfg, 0, process_count)
    if not source.uses_tokenizer and d.tokenizer != DataConfig.tokenizer:
        raise ValueError(
            f"data.tokenizer={d.tokenizer!r} only applies to data.source=text; data.source={d.source} "
            "makes its own tokens, so remove the override"
        )
    source.check(cfg, process_count)
    need = source.vocab_size(cfg)
    if need > cfg.model.vocab_size:
        raise ValueError(f"data needs vocab_size >= {need} ({d.source}) but model.vocab_size={cfg.model.vocab_size}")


def build_train_iterator(cfg, *, process_index: int = 0, process_count: int = 1):
    """Iterator of this process's batches (train.batch_size // process_count rows each).

    Yields dicts of numpy arrays: inputs/targets/segment_ids/positions int32 [B, T], loss_mask float32 [B, T].
    Exposes get_state() (JSON-serialisable) and set_state(state) for exact resume, and close(). With
    data.num_epochs > 0 a host source stops after that many epochs; the final batch is padded with empty rows.
    """
    _check_split(cfg, process_index, process_count)
    return SOURCES[cfg.data.source].train_iterator(cfg, process_index, process_count)


def build_eval_batches(
    cfg, n_batches: int, *, difficulty: int | None = None, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """Deterministic eval set: the task's eval seed stream (at eval difficulty), the text eval shards,
    or held-out synthetic steps. Text eval is one pass over the eval shards, so it may return fewer
    than n_batches; ``difficulty`` only applies to tasks.
    """
    _check_split(cfg, process_index, process_count)
    return SOURCES[cfg.data.source].eval_batches(cfg, n_batches, difficulty, process_index, process_count)
