"""On-device synthetic batches for throughput benchmarks: jax.random only, no host I/O, no grain."""

from __future__ import annotations


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
