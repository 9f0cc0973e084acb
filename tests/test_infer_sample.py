"""Sampling (asura.infer.sample) on hand-made logits, and generation's seeds, stops and lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer_cache import GEN, MAX_DEPTH, PROMPTS, random_model

from asura.infer.generate import generate
from asura.infer.sample import Sampling, sample

B, V = 64, 40
LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((B, V)).astype(np.float32) * 2)


def keys(seed: int, b: int = B):
    return jax.random.split(jax.random.key(seed), b)


def test_top_k_one_and_tiny_top_p_are_greedy():
    greedy = np.asarray(sample(LOGITS, keys(0), Sampling()))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(LOGITS), -1))
    for seed in range(3):
        for t in (0.5, 1.0, 5.0):
            np.testing.assert_array_equal(sample(LOGITS, keys(seed), Sampling(t, top_k=1)), greedy)
            np.testing.assert_array_equal(sample(LOGITS, keys(seed), Sampling(t, top_p=1e-9)), greedy)


def test_top_p_when_the_top_token_alone_exceeds_p():
    """p(top) = 0.97 > top_p = 0.5: the nucleus is the top token alone, never an empty set (NaN)."""
    logits = jnp.zeros((B, V)).at[:, 3].set(8.0)
    got = np.asarray(sample(logits, keys(1), Sampling(1.0, top_p=0.5)))
    np.testing.assert_array_equal(got, 3)


def draws(logits_V, s: Sampling, n: int = 4000) -> np.ndarray:
    """Token frequencies of n draws from one row of logits."""
    x = jnp.broadcast_to(logits_V, (n, logits_V.shape[0]))
    return np.bincount(np.asarray(sample(x, keys(2, n), s)), minlength=logits_V.shape[0]) / n


def test_temperature_top_k_top_p_distributions():
    """Empirical frequencies vs the filtered, renormalised softmax computed by hand (numpy)."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0], np.float32)
    cases = [
        (Sampling(1.0), None),
        (Sampling(0.5), None),
        (Sampling(2.0, top_k=3), 3),
        (Sampling(1.0, top_p=0.8), None),
    ]
    for s, k in cases:
        z = logits / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        keep = np.ones_like(p, bool)
        if k is not None:
            keep[k:] = False  # logits are sorted, so the top k are the first k
        if s.top_p < 1:
            keep &= (np.cumsum(p) - p) < s.top_p  # p(0..3) = .41 .25 .15 .09: the first three reach .82 >= .8
            assert keep.sum() == 3
        want = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        got = draws(jnp.asarray(logits), s)
        assert np.all(got[~keep] == 0), s
        np.testing.assert_allclose(got, want, atol=0.03, err_msg=str(s))  # 4000 draws: std <= 0.008


def test_sampling_refuses_bad_values():
    for kw, msg in (
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature must be finite"),  # every logit / inf: 0 or NaN
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ):
        with pytest.raises(ValueError, match=msg):
            Sampling(**kw)


@pytest.fixture(scope="module")
def model():
    return random_model(GEN, seed=4)


KW = dict(max_new_tokens=10, sampling=Sampling(temperature=1.5), max_depth=MAX_DEPTH)


def test_seeded_generation_is_deterministic(model):
    a = generate(model, PROMPTS, 3, seed=5, **KW)
    b = generate(model, PROMPTS, 3, seed=5, **KW)
    c = generate(model, PROMPTS, 3, seed=6, **KW)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert all(len(row) == 10 for row in a.tokens) and not any(a.stopped)  # max_new_tokens, no stop token


def test_stop_tokens_end_rows_independently(model):
    free = generate(model, PROMPTS, 3, seed=5, **KW).tokens
    stop = free[0][3]  # row 0 emits it at step 3 (or earlier); each row must stop at its own first one
    got = generate(model, PROMPTS, 3, seed=5, stop_tokens=[stop], **KW)
    for row, out, stopped in zip(free, got.tokens, got.stopped, strict=True):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert out == row[:cut] and stopped == (stop in row)
    assert any(got.stopped) and not all(got.stopped)  # the rows really end at different times
