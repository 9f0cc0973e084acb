"""``data.source``: where batches come from, listed once. Each entry carries what the train loop needs.

    Source.vocab_size(cfg)                     token ids the data can hold (<= model.vocab_size)
    Source.check(cfg, process_count)           one-line ValueErrors, run before any compilation
    Source.train_iterator(cfg, pi, pc)         this process's batches: next(), get_state() (JSON), set_state(), close()
    Source.eval_batches(cfg, n, difficulty, pi, pc)
                                               a fixed list of this process's numpy batches, disjoint from training
    Source.shown(cfg)                          the eval metrics that mean something for this data, in the order
                                               train.py, the progress bar and `asura.evaluate` show them
                                               (names from asura.train.evaluate.SHOWN)

task and text share the grain graph in asura.data.host; synthetic draws batches with jax.random.
Callers go through asura.data.pipeline (check_compatible, build_train_iterator, ...), which adds
the checks every source shares.

Pure python at import (every heavy module is imported inside the entry that uses it), so config
validation can read SOURCES.names cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from asura.registry import Registry

TASK_EPOCH = 1 << 20  # examples per task "epoch": tasks are generated per index, so any size works


@dataclass(frozen=True)
class Source:
    what: str  # one line for docs and --help
    uses_tokenizer: bool  # data.tokenizer means something only here; elsewhere a non-default value is an error
    vocab_size: Callable[..., int]  # (cfg)
    check: Callable[..., None]  # (cfg, process_count)
    train_iterator: Callable[..., Iterator]  # (cfg, process_index, process_count)
    eval_batches: Callable[..., list]  # (cfg, n_batches, difficulty, process_index, process_count)
    # Exact match means "the whole answer is right" only where a task scores an answer; on text a
    # row is a window of running text, so its exact match is ~0 and says nothing.
    shown: Callable[..., tuple[str, ...]]  # (cfg)


SOURCES: Registry[Source] = Registry("data.source", "where training and eval batches come from")


# ------------------------------------------------------------------ task


def _task_vocab_size(cfg) -> int:
    from asura.data import tasks

    return tasks.get_task(cfg.data.task).vocab_size_needed


def _task_check(cfg, process_count: int) -> None:
    from asura.data import tasks

    d = cfg.data
    task = tasks.get_task(d.task)
    tasks.check_fits(task, d.difficulty, d.seq_len)
    tasks.check_held_out(task, d.difficulty, d.held_out)
    tasks.check_min_difficulty(task, d.min_difficulty)
    if d.eval_difficulty:
        tasks.check_fits(task, d.eval_difficulty, d.seq_len, what="data.eval_difficulty")
        tasks.check_held_out(task, d.eval_difficulty, d.held_out, what="data.eval_difficulty")


def _task_train_iterator(cfg, process_index: int, process_count: int):
    from asura.data import host, tasks

    docs = host.task_documents(cfg, stream=tasks.TRAIN_STREAM, difficulty=cfg.data.difficulty, n_examples=TASK_EPOCH,
                               min_difficulty=cfg.data.min_difficulty)  # fmt: skip
    return host.train_iterator(cfg, docs, process_index=process_index, process_count=process_count)


def _task_eval_batches(cfg, n_batches: int, difficulty: int | None, process_index: int, process_count: int):
    from asura.data import host, tasks

    d = cfg.data
    difficulty = difficulty or d.eval_difficulty or d.difficulty
    docs = host.task_documents(cfg, stream=tasks.EVAL_STREAM, difficulty=difficulty, n_examples=TASK_EPOCH)
    return host.first_batches(cfg, docs, n_batches, process_index=process_index, process_count=process_count)


SOURCES.add(
    "task",
    Source(
        what="embedded reasoning tasks (data.task, data.difficulty), generated per index; ASCII byte tokens",
        uses_tokenizer=False,
        vocab_size=_task_vocab_size,
        check=_task_check,
        train_iterator=_task_train_iterator,
        eval_batches=_task_eval_batches,
        shown=lambda cfg: ("ce", "exact_match"),
    ),
)


# ------------------------------------------------------------------ text


def _text_vocab_size(cfg) -> int:
    from asura.data import text

    return text.resolve_shards(cfg.data.path).vocab_size


def _same_tokenizer(a: str, b: str) -> bool:
    # JSON tokenizers are named by path; the shards may have been prepared from another directory.
    return a == b or (a.endswith(".json") and os.path.basename(a) == os.path.basename(b))


def _text_check(cfg, process_count: int) -> None:
    from asura.data import text, tokenizer

    d = cfg.data
    tokenizer.check_spec(d.tokenizer, "data.tokenizer")
    train = text.resolve_shards(d.path, "train")
    evals = text.resolve_shards(d.path, "eval")
    if not _same_tokenizer(d.tokenizer, train.tokenizer):
        raise ValueError(
            f"data.tokenizer={d.tokenizer!r} but the shards at {d.path!r} were tokenised with {train.tokenizer!r}"
        )
    if not d.pack and train.max_doc_tokens < d.seq_len:
        raise ValueError(
            f"data.seq_len={d.seq_len} but the longest document in {d.path!r} has {train.max_doc_tokens} "
            "tokens and data.pack=false, so every row would be mostly padding; set data.pack=true or lower seq_len"
        )
    for shards in (train, evals):
        text.probe_shards(shards, train.vocab_size)


def _text_train_iterator(cfg, process_index: int, process_count: int):
    from asura.data import host, text

    docs = host.text_documents(text.resolve_shards(cfg.data.path, "train"))
    return host.train_iterator(cfg, docs, process_index=process_index, process_count=process_count)


def _text_eval_batches(cfg, n_batches: int, difficulty: int | None, process_index: int, process_count: int):
    """One pass over the eval shards, so possibly fewer than n_batches; text has no difficulty."""
    from asura.data import host, text

    docs = host.text_documents(text.resolve_shards(cfg.data.path, "eval"))
    return host.first_batches(cfg, docs, n_batches, process_index=process_index, process_count=process_count)


SOURCES.add(
    "text",
    Source(
        what="token shards from `python -m asura.data.prepare` (data.path, data.tokenizer)",
        uses_tokenizer=True,
        vocab_size=_text_vocab_size,
        check=_text_check,
        train_iterator=_text_train_iterator,
        eval_batches=_text_eval_batches,
        # bits/byte needs one token per byte; other tokenizers get perplexity per token
        shown=lambda cfg: ("ce", "accuracy", "bits_per_byte" if cfg.data.tokenizer == "byte" else "perplexity"),
    ),
)


# ------------------------------------------------------------------ synthetic


def _synthetic_vocab_size(cfg) -> int:
    return cfg.model.vocab_size


def _synthetic_check(cfg, process_count: int) -> None:
    pass  # any model and batch shape can be drawn


def _synthetic_train_iterator(cfg, process_index: int, process_count: int):
    from asura.data import synthetic

    return synthetic.SyntheticIterator(cfg, process_index=process_index, process_count=process_count)


def _synthetic_eval_batches(cfg, n_batches: int, difficulty: int | None, process_index: int, process_count: int):
    from asura.data import synthetic

    return synthetic.eval_batches(cfg, n_batches, process_index=process_index, process_count=process_count)


SOURCES.add(
    "synthetic",
    Source(
        what="uniform random tokens from jax.random (throughput benchmarks; needs no files and no grain)",
        uses_tokenizer=False,
        vocab_size=_synthetic_vocab_size,
        check=_synthetic_check,
        train_iterator=_synthetic_train_iterator,
        eval_batches=_synthetic_eval_batches,
        shown=lambda cfg: ("ce",),  # uniform random tokens: nothing to learn but the loss itself
    ),
)
