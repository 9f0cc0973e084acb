"""Synthetic batches for throughput benchmarks: jax.random only, no files, no grain.

A batch is a pure function of (train.seed, step), so the iterator's whole state is the step,
and eval uses steps no training run reaches (EVAL_STEP_OFFSET + i).
"""

from __future__ import annotations

import functools

import numpy as np

EVAL_STEP_OFFSET = 2**30  # held-out steps: a run would need 2**30 steps to train on them; still an int32


def synthetic_batch(cfg, step):
    """Global batch [train.batch_size, data.seq_len] of uniform random tokens, a pure function of (seed, step).

    ``step`` may be a traced value, so this can live inside a jitted step (pass cfg statically).
    One document per row: segment_ids 1, positions 0..T-1, every target scored except the last.
    """
    import jax
    import jax.numpy as jnp

    b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), step)
    tokens_BT1 = jax.random.randint(key, (b, t + 1), 0, v, dtype=jnp.int32)
    loss_mask_BT = jnp.ones((b, t), jnp.float32).at[:, -1].set(0.0)
    return {
        "inputs": tokens_BT1[:, :-1],
        "targets": jnp.where(loss_mask_BT > 0, tokens_BT1[:, 1:], 0),
        "loss_mask": loss_mask_BT,
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    }


def _process_rows(cfg, process_index: int, process_count: int):
    """Every process draws the global batch and keeps its own rows, as the host sources yield them."""
    n = cfg.train.batch_size // process_count
    return functools.partial(_local_batch, cfg=cfg, rows=slice(process_index * n, (process_index + 1) * n))


def _local_batch(step, *, cfg, rows):
    return {k: v[rows] for k, v in synthetic_batch(cfg, step).items()}


class SyntheticIterator:
    """This process's rows of synthetic_batch(cfg, step) as numpy, step = 0, 1, ...; the state is the step."""

    def __init__(self, cfg, *, process_index: int = 0, process_count: int = 1):
        import jax

        self._make = jax.jit(_process_rows(cfg, process_index, process_count))  # the step is traced: one compile
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._make(self.step)
        self.step += 1
        return {k: np.asarray(v) for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass  # nothing held: the next batch is a function of the step


def eval_batches(cfg, n_batches: int, *, process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    import jax

    make = jax.jit(_process_rows(cfg, process_index, process_count))
    return [{k: np.asarray(v) for k, v in make(EVAL_STEP_OFFSET + i).items()} for i in range(n_batches)]
