"""Data: embedded reasoning tasks, tokenised real text, and an on-device synthetic mode.

  asura.data.tasks      task registry (pointer_chase, addition, parity, reverse, modular_arith); pure numpy
  asura.data.prepare    CLI: text files / jsonl / Hugging Face datasets -> ArrayRecord token shards
  asura.data.pipeline   check_compatible, data_vocab_size, build_train_iterator, build_eval_batches, exact_match
  asura.data.synthetic  synthetic_batch(cfg, step): jax.random batches, no host I/O

Offline real-text default: ``python -m asura.data.prepare --builtin pydoc --output data/pydoc --eval-every 10``
(Python's own help topics), then ``data.source=text data.path=data/pydoc``.

Nothing here imports grain or JAX at import time (the GPU image lacks grain).
"""
