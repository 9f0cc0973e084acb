"""CheckpointStore retention (last N + best eval loss) and data-state encoding; no model needed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from asura.train.checkpoint import CheckpointStore, decode_data_state, encode_data_state


def test_keeps_last_n_plus_best(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2, async_save=True)
    state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 5.0, 6: 4.0}
    for step, loss in losses.items():
        store.save(step, {**state, "step": jnp.int32(step)}, {"pos": step}, {"step": step}, eval_ce=loss)
    store.wait()
    assert store.steps() == [2, 5, 6]  # best (eval loss 1.0) survives beyond the last two
    abstract = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    step, restored, data_state, meta = store.restore_latest_valid(abstract)
    assert step == 6 and int(restored["step"]) == 6 and data_state == {"pos": 6} and meta["step"] == 6
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    store.close()


def test_bytes_data_state_round_trips():
    raw = b"\x00\xffgrain-state"
    assert decode_data_state(encode_data_state(raw)) == raw
    assert decode_data_state(encode_data_state({"a": 1})) == {"a": 1}


def test_a_read_error_wrapped_in_a_bare_exception_is_a_corrupt_step(tmp_path):
    """Orbax raises a bare Exception from tensorstore's ValueError when a flipped bit lands in a zstd
    block (seen in CI: 'ZSTD_decompressStream() failed: Data corruption detected'): the step is
    unreadable, so resume falls back to the one before. Any other exception is a bug and raises."""
    import pytest

    store = CheckpointStore(tmp_path / "ckpt", keep=2, async_save=False)
    (tmp_path / "ckpt" / "4").mkdir(parents=True)

    def wrapped(step):
        try:
            raise ValueError("FAILED_PRECONDITION: ZSTD_decompressStream() failed: Data corruption detected")
        except ValueError as e:
            raise Exception("Encountered error while reading array index") from e

    attempt = store.attempt(4, wrapped)
    assert attempt.why == "ValueError: FAILED_PRECONDITION: ZSTD_decompressStream() failed: Data corruption detected"

    def bug(step):
        raise TypeError("a bug, not a corrupt file")

    with pytest.raises(TypeError, match="a bug"):
        store.attempt(4, bug)
