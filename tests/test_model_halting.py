"""Per-token halting (asura.model.halting, asura.model.exits): parity with fixed depth where nothing
halts, the loop drivers against the unrolled reference, the KV-cached decoder against the forward,
gradients through an early-stopped loop, and the refusals."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from asura.config.schema import ModelConfig
from asura.infer.cache import CachedModel
from asura.model.exits import EXIT_RULES
from asura.model.halting import HaltSpec

V, B, T, N = 40, 2, 9, 4
ALL_ON = ModelConfig(
    vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, iterations=N, max_iterations=N,
    injection="projconcat", iter_norm=True, post_norm=True, adapter="abba", adapter_rank=2, adapter_rank2=2,
    adapter_targets=("q", "k", "v", "o", "up", "down"), guidance="none", qk_norm=True, attention="xla",
)  # fmt: skip
PLAIN = ModelConfig(
    vocab_size=V, d_model=32, n_heads=2, n_layers=1, iterations=N, max_iterations=N, injection="add",
    loop_start="zero", iter_norm=False, post_norm=False, guidance="none", qk_norm=False, attention="xla",
    position="none",
)  # fmt: skip
TOKENS = np.random.default_rng(3).integers(0, V, (B, T)).astype(np.int32)
SEGMENTS = np.array([[1] * 4 + [2] * 5, [1] * 9], np.int32)  # row 0 packs two documents
# fp32 against fp32 in another op order (while vs unrolled, cache einsum vs full attention):
# u = 6e-8 per op, ~10^2 ops in series per layer, <= 8 layer applications, O(1) logits.
TOL = dict(rtol=2e-5, atol=2e-5)


def model_of(cfg, seed=0):
    return random_model(cfg, seed, 0.5)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("unroll_n",))
def _forward(graphdef, state, halt, n, unroll_n=None):
    """One program per (model, halt rule) for every depth and threshold; unroll_n: the unrolled
    reference at that static depth."""
    model = nnx.merge(graphdef, state)
    kw = dict(segment_ids_BT=jnp.asarray(SEGMENTS), halt=halt)
    res = model.run_loop(jnp.asarray(TOKENS), unroll_n, unroll=True, **kw) if unroll_n else (
        model.run_loop(jnp.asarray(TOKENS), n, max_depth=N, **kw)
    )  # fmt: skip
    return model.head(res.h_BTD), res.depth_BT


def forward(model, halt, n=N, unroll=False):
    logits, depth = _forward(*nnx.split(model), halt, jnp.int32(n), unroll_n=n if unroll else None)
    return np.asarray(logits), None if depth is None else np.asarray(depth)


def rule_values(model, rule: str) -> np.ndarray:
    """[N, B, T]: the rule's value at each iteration of the fixed-depth run."""
    entry = EXIT_RULES[rule]
    h_SBTD = model.latents(jnp.asarray(TOKENS), N, segment_ids_BT=jnp.asarray(SEGMENTS))
    prev = model.h0(model.embed[...][jnp.asarray(TOKENS)])
    state, out = entry.init(prev, V), []
    for t in range(N):
        state, v = entry.update(state, prev, h_SBTD[t], model, jnp.int32(t))
        out.append(np.asarray(v))
        prev = h_SBTD[t]
    return np.stack(out)


def mixed_spec(model, rule: str, kv: str = "copy", all_before_n: bool = False) -> HaltSpec:
    """A threshold at which this model's tokens exit at different depths, some before N (so the test
    exercises exits), and no token's rule value within 0.1% of it: another op order moves a value
    by ~1e-6 relative, which must not flip an exit. Candidates: the midpoints of the widest gaps
    between the fixed-depth run's values (searched, then asserted)."""
    gaps = []
    for v in rule_values(model, rule):
        v = np.unique(v)
        gaps += [((hi - lo) / max(abs(hi), 1e-6), (hi + lo) / 2) for lo, hi in itertools.pairwise(v)]
    for _, tau in sorted(gaps, reverse=True)[:24]:
        spec = HaltSpec(rule, float(tau), kv=kv)
        _, depth = forward(model, spec)
        if len(np.unique(depth)) < 2 or depth.min() >= N or (all_before_n and depth.max() >= N):
            continue
        if all((forward(model, HaltSpec(rule, float(tau * f), kv=kv))[1] == depth).all() for f in (0.999, 1.001)):
            return spec
    raise AssertionError(f"no threshold gives stable, mixed exit depths for rule {rule}")


@pytest.mark.parametrize("cfg", [ALL_ON, PLAIN], ids=["all_on", "plain"])
@pytest.mark.parametrize("kv", ["copy", "full"])
def test_never_exiting_equals_fixed_depth_bit_for_bit(cfg, kv):
    model = model_of(cfg)
    for n in range(1, N + 1):
        want, _ = forward(model, None, n)
        got, depth = forward(model, HaltSpec("never", kv=kv), n)
        np.testing.assert_array_equal(got, want)
        assert (depth == n).all()


@pytest.mark.parametrize("loop", ["while", "scan"])
def test_exit_after_k_equals_depth_k_bit_for_bit(loop):
    model = model_of(dataclasses.replace(ALL_ON, loop=loop))
    for k in range(1, N + 1):
        want, _ = forward(model, None, k)
        got, depth = forward(model, HaltSpec("steps", k), N)
        np.testing.assert_array_equal(got, want)
        assert (depth == k).all()


@pytest.mark.parametrize("rule", ["latent", "kl", "entropy_diff", "entropy", "argmax"])
def test_drivers_agree_with_the_unrolled_reference(rule):
    """The while driver stops when no token is active; the unrolled reference runs every step
    (a step with no active token must leave everything as it is); the scan driver skips."""
    model = model_of(PLAIN, seed=1)
    spec = mixed_spec(model, rule)
    ref, ref_depth = forward(model, spec, unroll=True)
    for loop in ("while", "scan"):
        m = model_of(dataclasses.replace(PLAIN, loop=loop), seed=1)
        got, depth = forward(m, spec)
        np.testing.assert_array_equal(depth, ref_depth)
        np.testing.assert_allclose(got, ref, **TOL)


def test_full_kv_picks_each_token_at_its_exit_from_the_full_depth_run():
    """kv=full (Ouro's released forward): every token runs the full depth; a token's output is the
    fixed-depth model's latent at its exit depth."""
    model = model_of(ALL_ON, seed=2)
    spec = mixed_spec(model, "latent", kv="full")
    res = model.run_loop(jnp.asarray(TOKENS), N, segment_ids_BT=jnp.asarray(SEGMENTS), halt=spec)
    h_SBTD = model.latents(jnp.asarray(TOKENS), N, segment_ids_BT=jnp.asarray(SEGMENTS))
    d = np.asarray(res.depth_BT)
    picked = np.take_along_axis(np.asarray(h_SBTD), (d - 1)[None, :, :, None], axis=0)[0]
    np.testing.assert_allclose(np.asarray(res.h_BTD), picked, **TOL)
    # every driver's per-step latents hold each token's exit latent from its exit on, also after
    # the loop stopped early (every token out before N)
    plain = model_of(PLAIN, seed=1)  # its latent change falls with t: every token can be out before N
    early = mixed_spec(plain, "latent", kv="full", all_before_n=True)
    out = {}
    for unroll in (False, True):
        kw = dict(segment_ids_BT=jnp.asarray(SEGMENTS), halt=early, keep_latents=True, unroll=unroll)
        r = plain.run_loop(jnp.asarray(TOKENS), N, **kw)
        np.testing.assert_allclose(np.asarray(r.h_SBTD[-1]), np.asarray(r.h_BTD), **TOL)
        out[unroll] = np.asarray(r.h_SBTD)
    np.testing.assert_allclose(out[False], out[True], **TOL)
    # copying the exited tokens' keys/values changes what later iterations of the others read
    copy, _ = forward(model, dataclasses.replace(spec, kv="copy"))
    full, _ = forward(model, spec)
    assert not np.allclose(copy, full, rtol=0, atol=1e-4)


def decode(model, spec, n=N, policy="per_iteration", prompt=1, rows=slice(None)):
    tokens, segments = TOKENS[rows], SEGMENTS[rows]
    cm = CachedModel(model, halt=spec)
    st = cm.prefill(cm.init(len(tokens), T, policy), tokens[:, :prompt], n, segment_ids_BT=segments[:, :prompt])
    logits, depth = [np.asarray(st.logits_BCV)], [np.asarray(st.depth_BC)]
    for i in range(prompt, T):
        st = cm.extend(st.cache, tokens[:, i : i + 1], n, segment_ids_BC=segments[:, i : i + 1])
        logits.append(np.asarray(st.logits_BCV))
        depth.append(np.asarray(st.depth_BC))
    return np.concatenate(logits, 1), np.concatenate(depth, 1)


@pytest.mark.parametrize("cfg", [ALL_ON, PLAIN], ids=["all_on", "plain"])
@pytest.mark.parametrize("rule", ["latent", "kl"])
def test_cached_decoding_with_exits_equals_the_forward(cfg, rule):
    """Token by token, a token's later iterations are never computed and the cache slots past its
    exit hold its last keys/values: the same numbers as the forward under kv=copy. Both rows
    together (the loop runs while either row's token is active), each row alone (batch 1: the loop
    stops at the token's exit), and a prompt of 4 (exits within the prefill chunk)."""
    model = model_of(cfg, seed=3)
    spec = mixed_spec(model, rule)
    want, want_depth = forward(model, spec)
    runs = [(slice(None), 1), (slice(None), 4), (slice(0, 1), 1), (slice(1, 2), 1)]
    for rows, prompt in runs:
        got, depth = decode(model, spec, prompt=prompt, rows=rows)
        np.testing.assert_array_equal(depth, want_depth[rows])
        np.testing.assert_allclose(got, want[rows], **TOL)


def test_cached_decoding_never_and_steps_equal_plain_decoding():
    model = model_of(ALL_ON, seed=4)
    plain_cm = CachedModel(model)
    for spec, n in ((HaltSpec("never"), N), (HaltSpec("steps", 1), 1), (HaltSpec("steps", 2), 2)):
        st = plain_cm.prefill(plain_cm.init(B, T), TOKENS, n, segment_ids_BT=SEGMENTS)
        want = np.asarray(st.logits_BCV)
        cm = CachedModel(model, halt=spec)
        got = cm.prefill(cm.init(B, T), TOKENS, N, segment_ids_BT=SEGMENTS)
        np.testing.assert_array_equal(np.asarray(got.logits_BCV), want)
        assert (np.asarray(got.depth_BC) == n).all()


def test_one_program_serves_every_depth_under_halting():
    model = model_of(PLAIN, seed=5)
    graphdef, state = nnx.split(model)
    spec = HaltSpec("latent", 0.5)

    @jax.jit
    def run(state, n):
        res = nnx.merge(graphdef, state).run_loop(jnp.asarray(TOKENS), n, max_depth=N, halt=spec)
        return res.depth_BT

    for n in range(1, N + 1):
        assert np.asarray(run(state, jnp.int32(n))).max() <= n
    assert run._cache_size() == 1


@pytest.mark.parametrize("remat", ["none", "iteration", "sqrt"])
def test_gradients_through_an_early_stopped_loop(remat):
    """The while driver's backward starts from the steps that ran: with every token out after 2 of
    4 iterations it equals depth 2's gradient, and with mixed exits the unrolled reference's."""
    cfg = dataclasses.replace(PLAIN, remat=remat)
    model = model_of(cfg, seed=6)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(TOKENS),
        "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        "loss_mask": jnp.ones((B, T)),
    }
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("n", "unroll"))
    def grad(n, halt, unroll=False):
        g = jax.grad(lambda st: nnx.merge(graphdef, st).loss(batch, n=n, halt=halt, unroll=unroll)[0])(state)
        return jax.tree.leaves(g)

    for got, want in zip(grad(N, HaltSpec("steps", 2)), grad(2, None), strict=True):
        np.testing.assert_allclose(got, want, **TOL)
    spec = mixed_spec(model, "latent")
    for got, want in zip(grad(N, spec), grad(N, spec, unroll=True), strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_padding_never_iterates_and_never_is_never():
    """Segment-0 padding starts exited (depth 0), so it cannot keep the loop running; the real
    tokens' outputs are those of the unpadded rows. `never` ignores any threshold."""
    model = model_of(PLAIN, seed=8)
    seg = SEGMENTS.copy()
    seg[1, 6:] = 0  # row 1: three trailing padding positions
    spec = HaltSpec("steps", 2)
    res = model.run_loop(jnp.asarray(TOKENS), N, segment_ids_BT=jnp.asarray(seg), halt=spec)
    depth = np.asarray(res.depth_BT)
    assert (depth[seg == 0] == 0).all() and (depth[seg != 0] == 2).all()
    for tau in (0.0, -1.0, 1e9):
        _, d = forward(model, HaltSpec("never", tau))
        assert (d == N).all()


def test_refusals():
    with pytest.raises(ValueError, match=r"exit rule='nope' is not valid; choose one of never, steps, latent"):
        HaltSpec("nope")
    with pytest.raises(ValueError, match=r"kv='mixed' is not valid; choose one of copy, full"):
        HaltSpec("latent", kv="mixed")
    with pytest.raises(ValueError, match="'steps' has no default threshold"):
        _ = HaltSpec("steps").tau
    with pytest.raises(ValueError, match="kv=copy only"):
        CachedModel(model_of(PLAIN), halt=HaltSpec("latent", kv="full"))
    assert set(EXIT_RULES.names) >= {"never", "steps", "latent", "kl", "entropy_diff", "entropy", "argmax"}


def test_generation_with_exits_matches_the_forward_over_what_it_generated():
    """Greedy generation under a rule: each new token is the argmax of the forward under the same
    rule over prompt + generated tokens, produced at the depth the forward gives that position;
    `never` and `steps:k` generate what fixed depth n and k generate."""
    from asura.infer.generate import generate

    model = model_of(ALL_ON, seed=7)
    spec = mixed_spec(model, "latent")
    prompts = [TOKENS[0, :3].tolist(), TOKENS[1, :5].tolist()]
    out = generate(model, prompts, N, max_new_tokens=5, halt=spec)
    for prompt, new, depths in zip(prompts, out.tokens, out.depths, strict=True):
        seq = jnp.asarray([prompt + new])
        res = model.run_loop(seq, N, halt=spec)
        P = len(prompt)
        pred = np.asarray(jnp.argmax(model.head(res.h_BTD), -1))[0, P - 1 : -1]
        assert pred.tolist() == new
        assert np.asarray(res.depth_BT)[0, P - 1 : -1].tolist() == depths
    assert len({d for ds in out.depths for d in ds}) > 1 or min(min(ds) for ds in out.depths) < N
    for spec, n in ((HaltSpec("never"), N), (HaltSpec("steps", 2), 2)):
        want = generate(model, prompts, n, max_new_tokens=5)
        got = generate(model, prompts, N, max_new_tokens=5, halt=spec)
        assert got.tokens == want.tokens and all(d == [n] * len(d) for d in got.depths)
    with pytest.raises(ValueError, match="halting decodes with a KV cache and kv=copy"):
        generate(model, prompts, N, max_new_tokens=2, halt=spec, cache="recompute")
