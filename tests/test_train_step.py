"""Unit tests for the train step: optimiser mask/schedule, grad accumulation, NaN skip, one compile for all depths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from asura.train.checkpoint import ConfigMismatchError, check_resume_config
from asura.train.loop import FAST_COMPILE
from asura.train.optim import decay_mask, decays, lr_schedule
from asura.train.state import init_state
from asura.train.step import accumulated_grads, make_train_step


def tiny(*extra: str):
    return tiny_config("model.max_iterations=3", "train.steps=10", *extra)


def batch_for(cfg, seed: int = 0) -> dict:
    """A random token batch with ragged loss masks (so microbatches hold different token counts)."""
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    lengths = rng.integers(1, T, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask,
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    }


def test_decay_mask_excludes_norms_biases_embeddings():
    cfg = tiny("model.tie_embeddings=false", "model.adapter=abba")
    built = init_state(cfg)
    state, mask = built.state, decay_mask(built.axes)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["embed"] is False
    assert flat["w_proj"] is True and flat["unembed"] is True
    assert flat["blocks/0/attn/q/kernel"] is True and flat["blocks/0/mlp/up/kernel"] is True
    no_decay = [k for k in flat if "norm" in k or "/ln" in k or k.endswith(("bias", "scale"))]
    assert no_decay and not any(flat[k] for k in no_decay)
    # Per-iteration norm params are 2-D ([I, D]) and must still be excluded.
    assert state["params"]["iter_norm"]["scale"].ndim == 2 and flat["iter_norm/scale"] is False
    assert flat["blocks/0/attn/q/adapter/u1"] is True  # [M, d_in, r]: a per-iteration matrix
    assert decays(("iteration", "embed")) is False  # a per-iteration norm scale
    assert decays(("embed",)) is False and decays(None) is False
    assert decays(("vocab", "embed")) is False and decays(("embed", "vocab")) is True  # table vs head


def test_lr_schedule_warmup_then_cosine_floor():
    t = tiny("train.lr=1.0", "train.warmup_steps=4", "train.steps=20", "train.min_lr_ratio=0.1").train
    sched = lr_schedule(t)
    assert float(sched(0)) == 0.0
    assert float(sched(4)) == pytest.approx(1.0)
    assert float(sched(2)) == pytest.approx(0.5)
    assert float(sched(20)) == pytest.approx(0.1)
    assert float(sched(12)) < float(sched(8))


def test_grad_accumulation_equals_full_batch():
    cfg1, cfg4 = tiny(), tiny("train.grad_accum=4")
    graphdef, rest, state, _ = init_state(cfg1)
    batch = jax.tree.map(jnp.asarray, batch_for(cfg1))
    n = jnp.int32(2)
    f1 = jax.jit(lambda p, b: accumulated_grads(cfg1, graphdef, rest, p, b, n), compiler_options=FAST_COMPILE)
    f4 = jax.jit(lambda p, b: accumulated_grads(cfg4, graphdef, rest, p, b, n), compiler_options=FAST_COMPILE)
    loss1, aux1, g1 = f1(state["params"], batch)
    loss4, aux4, g4 = f4(state["params"], batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    np.testing.assert_allclose(aux4["ce_per_iter"], aux1["ce_per_iter"], rtol=1e-5, atol=1e-7)
    assert float(aux4["tokens"]) == float(aux1["tokens"])
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)  # float summation order only


def test_one_compile_for_all_depths_and_nan_skip():
    cfg = tiny("model.max_iterations=3")
    graphdef, rest, state, axes = init_state(cfg)
    traces = []
    step_fn = make_train_step(cfg, graphdef, rest, axes)

    def counted(*args):
        traces.append(1)
        return step_fn(*args)

    step = jax.jit(counted, donate_argnums=(0,), compiler_options=FAST_COMPILE)
    batch = jax.tree.map(jnp.asarray, batch_for(cfg))
    bad = {**batch, "loss_mask": jnp.full_like(batch["loss_mask"], jnp.nan)}  # a non-finite loss
    depths = []
    for n in (1, 2, 3, 2):
        state, m = step(state, batch, jnp.int32(n))
        depths.append(int(m["depth"]))
    assert depths == [1, 2, 3, 2] and len(traces) == 1
    # ce_per_iter differs with depth: the depth is really used, not baked in.
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, bad, jnp.int32(2))
    assert len(traces) == 1
    assert not bool(m["finite"]) and int(m["nan_streak"]) == 1 and int(m["nan_total"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(before["opt_state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(state["step"]) == int(before["step"]) + 1 and int(state["opt_step"]) == int(before["opt_step"])
    state, m = step(state, batch, jnp.int32(2))
    assert bool(m["finite"]) and int(m["nan_streak"]) == 0 and int(m["nan_total"]) == 1


def test_resume_config_check():
    old = tiny("train.steps=20")
    assert check_resume_config(old, tiny("train.steps=20", "train.log_every=3"), 10) == ["train.log_every"]
    with pytest.raises(ConfigMismatchError, match=r"train\.lr"):
        check_resume_config(old, tiny("train.steps=20", "train.lr=0.5"), 10)
    with pytest.raises(ConfigMismatchError, match=r"model\.d_model"):
        check_resume_config(old, tiny("train.steps=20", "model.d_model=64"), 10)
    # train.steps reshapes the cosine: refused once a trained step would get another lr, with both ways out
    with pytest.raises(ConfigMismatchError, match=r"train\.steps 20 -> 30 would change the lr .*--extend continue"):
        check_resume_config(old, tiny("train.steps=30"), 10)
    # ... but allowed as an extension that keeps every trained step's lr
    for key in ("train.hold_at", "train.rewarm_at"):
        assert check_resume_config(old, tiny("train.steps=30", f"{key}=[20]"), 20) == [key, "train.steps"]
    # and before any step past the warmup (where only warmup_steps matter) nothing changes
    assert check_resume_config(old, tiny("train.steps=30"), 1) == ["train.steps"]


def test_depths_past_max_iterations_run_at_their_depth_not_clipped():
    """With an extrapolation mode, train and eval depths above max_iterations must really run
    that deep (a traced n past the loop length gives NaN outputs, so the step must pass max_depth)."""
    from asura.depth import depth_distribution, sample_depth
    from asura.train.state import merge_model
    from asura.train.step import make_eval_step

    cfg = tiny("model.extrapolation=last", "model.iterations=5", "train.eval_depths=[3,5]")
    assert sample_depth(cfg, 0) == 5 and depth_distribution(cfg) == {5: 1.0}
    graphdef, rest, state, axes = init_state(cfg)
    batch = {k: jnp.asarray(v) for k, v in batch_for(cfg).items()}
    model = merge_model(graphdef, state["params"], rest)

    ev = jax.jit(make_eval_step(cfg, graphdef, rest), compiler_options=FAST_COMPILE)
    got = {n: float(ev(state["params"], batch, jnp.int32(n))[0]["ce"]) for n in (3, 5)}
    want = {n: float(model.loss(batch, n=n)[1]["ce"]) for n in (3, 5)}
    assert got[5] != got[3]
    np.testing.assert_allclose([got[3], got[5]], [want[3], want[5]], rtol=1e-5)

    step = jax.jit(make_train_step(cfg, graphdef, rest, axes), compiler_options=FAST_COMPILE)
    _, metrics = step(state, batch, jnp.int32(5))
    np.testing.assert_allclose(float(metrics["objective"]), float(model.loss(batch, n=5)[0]), rtol=1e-5)
