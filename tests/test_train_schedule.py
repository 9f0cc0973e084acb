"""The lr schedule with extension events, and the resume check's structural comparison of two schedules.

`schedule_change` decides without evaluating anything (the resume check runs before JAX compiles);
here it is held against the schedules themselves, evaluated step by step: over a grid of old/new
configs and resume points, it reports a change exactly when some trained step's lr differs.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asura.config.schema import TrainConfig
from asura.train.optim import lr_schedule, schedule_change, segments

BASE = TrainConfig(steps=20, lr=1e-2, warmup_steps=4, min_lr_ratio=0.1)


def lrs(t: TrainConfig, upto: int) -> np.ndarray:
    return np.asarray(lr_schedule(t)(jnp.arange(upto)))


def test_an_unextended_schedule_is_optax_warmup_cosine_bit_for_bit():
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 4, 20, 1e-3)
    np.testing.assert_array_equal(lrs(BASE, 30), np.asarray(want(jnp.arange(30))))


def test_hold_and_rewarm_segments():
    hold = dataclasses.replace(BASE, steps=30, hold_at=(20,))
    got = lrs(hold, 30)
    np.testing.assert_array_equal(got[:20], lrs(BASE, 20))  # the old schedule, untouched
    np.testing.assert_allclose(got[20:], 1e-3, rtol=1e-6)  # then the floor it reached (float32 of lr * ratio)
    rewarm = dataclasses.replace(BASE, steps=30, rewarm_at=(20,))
    got = lrs(rewarm, 31)
    np.testing.assert_array_equal(got[:20], lrs(BASE, 20))
    # warmup from the floor to lr over 4 steps, then cosine to the floor at step 30
    np.testing.assert_allclose(got[20:25], np.linspace(1e-3, 1e-2, 5), rtol=1e-5)
    assert np.all(np.diff(got[24:31]) < 0) and abs(got[30] - 1e-3) < 1e-8
    assert [s.kind for s in segments(dataclasses.replace(BASE, steps=40, hold_at=(20,), rewarm_at=(30,)))] == [
        "cosine",
        "hold",
        "rewarm",
    ]


CANDIDATES = [
    BASE,
    dataclasses.replace(BASE, steps=30),
    dataclasses.replace(BASE, steps=10),
    dataclasses.replace(BASE, steps=3),  # shorter than the warmup: the effective warmup shrinks
    dataclasses.replace(BASE, steps=30, hold_at=(20,)),
    dataclasses.replace(BASE, steps=30, rewarm_at=(20,)),
    dataclasses.replace(BASE, steps=40, hold_at=(20,), rewarm_at=(30,)),
    dataclasses.replace(BASE, steps=40, hold_at=(20, 30)),
    dataclasses.replace(BASE, steps=40, rewarm_at=(20, 30)),
    dataclasses.replace(BASE, steps=12, hold_at=(20,)),  # shortened, keeping the old cosine
]


@pytest.mark.parametrize(("old", "new"), list(itertools.permutations(CANDIDATES, 2)))
def test_schedule_change_is_exactly_a_trained_step_with_another_lr(old, new):
    for trained in (1, 3, 4, 5, 12, 20, 21, 25, 30, 35):
        a, b = lrs(old, trained), lrs(new, trained)
        differs = bool(np.any(a != b))
        said = schedule_change(old, new, trained)
        assert (said is not None) == differs, f"trained={trained}: said {said!r}, lr differs: {differs}"
