"""KV-cached decoding (asura.infer) against the model's own full forward pass.

The oracle is LoopedLM.__call__ (the training program, itself tested against a plain-JAX GPT
and an unrolled loop in test_model_parity.py). Every parameter is random, adapters and
per-iteration norms included, so a wrong iteration slot, cache slot, RoPE position or mask
changes the logits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model as _random_model
from flax import nnx

from asura.config.schema import ModelConfig
from asura.depth import DepthError
from asura.infer.cache import CachedModel, _extend_jit, init_cache
from asura.infer.generate import _generate, generate, left_pad
from asura.infer.policies import POLICIES, generation_memory
from asura.infer.sample import Sampling
from asura.model import LoopedLM

# The cached path runs the same ops as the forward, but its reductions run in another order
# (softmax and AV over [T cached | C new] keys, masked entries exactly 0, instead of one T-key
# row; a scan+cond instead of scan+switch). fp32 rounding u = 6e-8 per op, O(10²) ops in series
# per layer application, n·L <= 10 applications: ~1e-5 of the logits' scale at worst. We see
# ~3e-7; a real bug (a wrong slot, position or mask) moves logits by 1e-2 or more.
REL = 1e-5

ALL_ON = ModelConfig(
    vocab_size=48, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, iterations=3, max_iterations=3,
    injection="projconcat", iter_norm=True, post_norm=True, adapter="abba", adapter_rank=2, adapter_rank2=2,
    adapter_targets=("q", "k", "v", "o", "up", "down"), guidance="linear", qk_norm=True, attention="xla",
)  # fmt: skip
# The other choice of every flag the decode path touches: additive injection, LoRA, SwiGLU,
# RMSNorm, untied head, multi-query attention (one kv head), no per-iteration norms, no RoPE,
# the loop started from h_0 = 0.
OTHERS = dataclasses.replace(
    ALL_ON, injection="add", adapter="lora", mlp="swiglu", norm="rmsnorm", tie_embeddings=False, n_kv_heads=1,
    loop_start="zero", iter_norm=False, post_norm=False, qk_norm=False, guidance="none",
    adapter_targets=("q", "k", "v", "gate"), position="none",
)  # fmt: skip
MAX_DEPTH = 5  # past max_iterations=3: extrapolation last / cycle


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 1.0) -> LoopedLM:
    """conftest.random_model with small biases (N(0, 0.02²))."""
    return _random_model(cfg, seed, scale, bias_std=0.02)


@nnx.jit
def _forward(model, tokens_BT, n, segment_ids_BT):
    return model(tokens_BT, n=n, segment_ids_BT=segment_ids_BT, max_depth=MAX_DEPTH)


def forward(model, tokens_BT, n: int, segment_ids_BT) -> np.ndarray:
    """The oracle: the model's own forward (the training program; n traced, one compile per shape)."""
    return np.asarray(_forward(model, jnp.asarray(tokens_BT), jnp.int32(n), jnp.asarray(segment_ids_BT)))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def decode_all(cm: CachedModel, tokens_BT, seg_BT, n, policy, max_depth=MAX_DEPTH, prompt=1):
    """Logits [B, T, V]: prefill the first `prompt` tokens, then decode the rest one at a time."""
    B, T = tokens_BT.shape
    st = cm.prefill(cm.init(B, T, policy, max_depth), tokens_BT[:, :prompt], n, segment_ids_BT=seg_BT[:, :prompt])
    out = [np.asarray(st.logits_BCV)]
    for i in range(prompt, T):
        st = cm.extend(st.cache, tokens_BT[:, i : i + 1], n, segment_ids_BC=seg_BT[:, i : i + 1])
        out.append(np.asarray(st.logits_BCV))
    return np.concatenate(out, axis=1)


TOKENS = np.random.default_rng(7).integers(0, 48, (2, 12)).astype(np.int32)
SEGMENTS = np.array([[1] * 5 + [2] * 7, [1] * 12], np.int32)  # row 0 packs two documents


@pytest.mark.parametrize(
    "cfg,extrapolation", [(ALL_ON, "last"), (ALL_ON, "cycle"), (OTHERS, "last")], ids=["all_on-last", "all_on-cycle",
                                                                                        "others-last"]
)  # fmt: skip
def test_per_iteration_decode_equals_forward_every_position_every_depth(cfg, extrapolation):
    """Token-by-token decoding = the full forward at every position, for every depth 1..5
    (past max_iterations=3 through the extrapolation mode), packed segments included."""
    model = random_model(dataclasses.replace(cfg, extrapolation=extrapolation), seed=1)
    cm = CachedModel(model)
    compiled = _extend_jit._cache_size()
    for n in range(1, MAX_DEPTH + 1):
        ref = forward(model, TOKENS, n, SEGMENTS)
        got = decode_all(cm, TOKENS, SEGMENTS, n, "per_iteration")
        assert rel_err(got, ref) < REL, (n, rel_err(got, ref))
    assert _extend_jit._cache_size() - compiled == 2  # prefill + decode: one program each for all 5 depths


def test_prefill_then_decode_equals_forward_of_the_concatenation():
    """A ragged, left-padded prompt prefilled in one chunk, then k decode steps = the forward
    of prompt + continuation (the same segment ids: 0 = padding)."""
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="cycle"), seed=2)
    cm = CachedModel(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    tokens_BP, seg_BP = left_pad(prompts)
    cont_BK = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], np.int32)
    k = cont_BK.shape[1]
    full_BT = np.concatenate([tokens_BP, cont_BK], axis=1)
    seg_BT = np.concatenate([seg_BP, np.ones_like(cont_BK)], axis=1)
    for n in (1, 3, 5):
        ref = forward(model, full_BT, n, seg_BT)
        st = cm.prefill(cm.init(2, full_BT.shape[1], "per_iteration", MAX_DEPTH), tokens_BP, n, segment_ids_BT=seg_BP)
        got = [np.asarray(st.logits_BCV)]
        for i in range(k):
            st = cm.extend(st.cache, cont_BK[:, i : i + 1], n)  # segment and position continue each row
            got.append(np.asarray(st.logits_BCV))
        got = np.concatenate(got, axis=1)
        real = seg_BT > 0  # padding positions' logits are not defined by the model's contract
        assert rel_err(got[real], ref[real]) < REL, n
        assert int(st.cache.length) == full_BT.shape[1]
        np.testing.assert_array_equal(np.asarray(st.cache.next_position_B), [len(p) + k for p in prompts])


def test_chunked_extend_equals_forward():
    """extend() with C > 1 new tokens at once (chunked prefill) over a non-empty cache."""
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="last"), seed=3)
    cm = CachedModel(model)
    n = 4
    ref = forward(model, TOKENS, n, SEGMENTS)
    st = cm.prefill(cm.init(2, 12, "per_iteration", MAX_DEPTH), TOKENS[:, :3], n, segment_ids_BT=SEGMENTS[:, :3])
    got = [np.asarray(st.logits_BCV)]
    for a, b in ((3, 7), (7, 12)):
        st = cm.extend(st.cache, TOKENS[:, a:b], n, segment_ids_BC=SEGMENTS[:, a:b])
        got.append(np.asarray(st.logits_BCV))
    assert rel_err(np.concatenate(got, axis=1), ref) < REL


def test_reused_cache_ignores_what_a_longer_sequence_left_behind():
    """prefill restarts a cache at index 0; positions past `length` still hold the previous
    sequence's keys and segment ids, and must stay invisible."""
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="last"), seed=8)
    cm = CachedModel(model)
    n, seg = 4, np.ones_like(TOKENS)
    ref = forward(model, TOKENS[:, :6], n, np.ones_like(TOKENS[:, :6]))
    st = cm.prefill(cm.init(2, 12, "per_iteration", MAX_DEPTH), TOKENS[:, ::-1].copy(), n, segment_ids_BT=seg)
    st = cm.prefill(st.cache, TOKENS[:, :3], n)  # the same cache object, now 3 long
    got = [np.asarray(st.logits_BCV)]
    for i in range(3, 6):
        st = cm.extend(st.cache, TOKENS[:, i : i + 1], n)
        got.append(np.asarray(st.logits_BCV))
    assert rel_err(np.concatenate(got, axis=1), ref) < REL


# Generation tests compile a whole prefill + decode loop per prompt shape: one block keeps them quick.
GEN = dataclasses.replace(ALL_ON, n_layers=1, extrapolation="last")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 31], [9, 8]]  # ragged; two lengths, so alone compiles twice


def test_ragged_batch_generation_equals_each_row_alone():
    """Rows of a left-padded batch generate what each generates alone (same seed per row).
    Sampled, so the cache holds diverse tokens; the decode logits agree to fp32 rounding."""
    model = random_model(GEN, seed=4)
    seeds = [11, 12, 13]
    kw = dict(max_new_tokens=10, sampling=Sampling(temperature=1.5), max_depth=MAX_DEPTH)
    batch = generate(model, PROMPTS, 4, seed=seeds, **kw)
    assert len({t for row in batch.tokens for t in row}) > 5  # the test exercises diverse tokens
    for b, p in enumerate(PROMPTS):
        alone = generate(model, [p], 4, seed=[seeds[b]], **kw)
        assert alone.tokens[0] == batch.tokens[b]
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[b], rtol=0, atol=1e-5)


def test_cached_generation_equals_uncached():
    """per_iteration generation = recompute (a full forward over the buffer per token)."""
    model = random_model(GEN, seed=5)
    kw = dict(max_new_tokens=10, sampling=Sampling(temperature=1.5), seed=3, max_depth=MAX_DEPTH)
    for n in (2, 5):
        cached = generate(model, PROMPTS, n, cache="per_iteration", **kw)
        uncached = generate(model, PROMPTS, n, cache="recompute", **kw)
        assert cached.tokens == uncached.tokens
        np.testing.assert_allclose(np.concatenate(cached.logprobs), np.concatenate(uncached.logprobs), atol=1e-5)


def test_shared_last_is_exact_at_depth_one_and_approximate_beyond():
    """shared_last reads the earlier tokens' last-iteration k/v: at depth 1 that IS iteration
    0's (exact); deeper it is a different model (measured in bench/generate.py, not a parity)."""
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="last"), seed=6)
    cm = CachedModel(model)
    for n in (1, 3):
        ref = forward(model, TOKENS, n, SEGMENTS)
        got = decode_all(cm, TOKENS, SEGMENTS, n, "shared_last", prompt=4)
        # the prefilled prompt runs every iteration over its own k/v: exact at every depth
        assert rel_err(got[:, :4], np.asarray(ref)[:, :4]) < REL
        if n == 1:
            assert rel_err(got, ref) < REL
        else:
            assert rel_err(got, ref) > 1e-3


def test_shared_last_equals_per_iteration_over_last_iteration_slots():
    """What shared_last means, built another way: per_iteration decoding over a cache whose every
    slot is overwritten, before each step, with the last iteration's (n-1) keys/values."""
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="cycle"), seed=9)
    cm = CachedModel(model)
    n, seg = 4, np.ones_like(TOKENS)
    shared = decode_all(cm, TOKENS[:, :8], seg[:, :8], n, "shared_last", prompt=3)
    st = cm.prefill(cm.init(2, 8, "per_iteration", MAX_DEPTH), TOKENS[:, :3], n)
    got = [np.asarray(st.logits_BCV)]
    for i in range(3, 8):
        c = st.cache
        last = lambda x: jnp.broadcast_to(x[n - 1], x.shape)
        c = dataclasses.replace(c, k_RLBTKH=last(c.k_RLBTKH), v_RLBTKH=last(c.v_RLBTKH))
        st = cm.extend(c, TOKENS[:, i : i + 1], n)
        got.append(np.asarray(st.logits_BCV))
    assert rel_err(np.concatenate(got, axis=1), shared) < REL


def test_cache_memory_per_policy():
    model = random_model(dataclasses.replace(ALL_ON, extrapolation="last"))
    cfg = model.cfg
    sizes = {}
    for name in ("per_iteration", "shared_last"):
        cache = CachedModel(model).init(3, 20, name, max_depth=MAX_DEPTH)
        facts = dict(layers=cfg.n_layers, batch=3, length=20, kv_heads=cfg.kv_heads, head_dim=cfg.d_head, itemsize=4)
        assert cache.nbytes() == POLICIES[name].cache_bytes(S=MAX_DEPTH, **facts)
        sizes[name] = cache.nbytes()
    assert sizes["per_iteration"] == MAX_DEPTH * sizes["shared_last"]  # S·L·B·T·K·H·2·4 bytes vs L·B·T·K·H·2·4
    assert POLICIES["recompute"].cache_bytes(S=MAX_DEPTH, **facts) == 0


@pytest.mark.parametrize(
    "policy,prompt,new,max_depth",
    [("per_iteration", 2048, 256, 5), ("per_iteration", 64, 2048, 32), ("shared_last", 64, 2048, 32),
     ("recompute", 64, 2048, 5)],
)  # fmt: skip
def test_generation_memory_estimate_against_xla(policy, prompt, new, max_depth):
    """asura.generate refuses a request whose generation_memory exceeds the device's. Against the
    compiled program's own account (XLA memory_analysis: arguments + outputs + temporaries), at
    shapes where the prompt's attention, the cache, or recompute's full forward dominates: the
    estimate is for refusing what cannot fit (orders of magnitude), so within 2x either way."""
    cfg = dataclasses.replace(ALL_ON, extrapolation="last", vocab_size=256)  # attention="xla" on any backend
    graphdef, state = nnx.split(random_model(cfg))
    tokens = jnp.zeros((1, prompt), jnp.int32)
    kw = dict(max_new=new, sampling=Sampling(), stop=(), policy=policy, max_depth=max_depth)
    compiled = _generate.lower(graphdef, state, tokens, None, jnp.int32(3), jnp.zeros((1,), jnp.int32), **kw).compile()
    m = compiled.memory_analysis()
    if m is None:
        pytest.skip(f"no memory_analysis on {jax.default_backend()}")
    xla = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    params = sum(x.nbytes for x in jax.tree.leaves(state))
    est = generation_memory(cfg, policy, batch=1, prompt_len=prompt, max_new=new, scan_len=max_depth,
                            param_bytes=params, attention="xla")  # fmt: skip
    assert 0.5 < est.total / xla < 2, (est, xla)
    if POLICIES[policy].cached:
        assert est.cache == init_cache(random_model(cfg), 1, prompt + new, policy, max_depth).nbytes()


def test_refusals():
    model = random_model(ALL_ON)  # extrapolation none
    cm = CachedModel(model)
    with pytest.raises(DepthError, match=r"exceeds model\.max_iterations=3"):
        cm.init(1, 8, "per_iteration", max_depth=4)
    with pytest.raises(ValueError, match=r"cache='nope' is not valid; choose one of per_iteration, shared_last"):
        cm.init(1, 8, "nope")
    with pytest.raises(ValueError, match="keeps no KV cache"):
        cm.init(1, 8, "recompute")
    st = cm.prefill(cm.init(1, 4), np.ones((1, 3), np.int32), 2)
    st = cm.extend(st.cache, np.ones((1, 1), np.int32), 2)
    with pytest.raises(ValueError, match="overflow a cache of 4"):
        cm.extend(st.cache, np.ones((1, 1), np.int32), 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 2, max_new_tokens=2)
    with pytest.raises(DepthError):
        generate(model, [[1]], 4, max_new_tokens=2)


@pytest.mark.slow
def test_prefill_through_the_configured_pallas_kernel():
    """prefill runs model.attention (here Pallas: interpret mode on CPU, the compiled kernel on a
    GPU/TPU) exactly as training; decode steps attend over the cache with the XLA einsum."""
    cfg = dataclasses.replace(ALL_ON, n_layers=1, extrapolation="last")
    ref_model, model = random_model(cfg, seed=1), random_model(dataclasses.replace(cfg, attention="pallas"), seed=1)
    for n in (2, 5):
        got = decode_all(CachedModel(model), TOKENS, SEGMENTS, n, "per_iteration", prompt=8)
        assert rel_err(got, forward(ref_model, TOKENS, n, SEGMENTS)) < REL
