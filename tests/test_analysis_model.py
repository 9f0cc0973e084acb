"""Analysis against a real (tiny, untrained) LoopedLM: depth evaluation and telemetry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEMO, tiny_config
from flax import nnx

from asura.analysis import depth
from asura.data.packing import exact_match
from asura.data.pipeline import build_eval_batches
from asura.model import LoopedLM

# On top of TINY (and demo.yaml): demo's heads and sequence length, 3 iteration slots, 4 rows.
EXTRA = ("model.n_heads=4", "data.seq_len=64", "model.max_iterations=3", "train.batch_size=4")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(*EXTRA, "model.extrapolation=last", base=DEMO)
    model = LoopedLM(cfg.model, rngs=nnx.Rngs(0))
    batches = build_eval_batches(cfg, 2)
    return cfg, model, batches


def _fwd(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


# References straight from the model's API (jitted for speed; traced n = the model's own variable-depth path).
@nnx.jit
def _ref(model, b, n):
    kw = dict(positions_BT=b["positions"], segment_ids_BT=b["segment_ids"])
    h_SBTD = model.latents(b["inputs"], n=n, **kw)
    return {
        "logits": model(b["inputs"], n=n, **kw),
        "ce": model.loss(b, n=n)[1]["ce"],
        "h": h_SBTD,
        "lens": jax.vmap(model.head)(h_SBTD),
        "h0": model.embed[...][b["inputs"]],
    }


@nnx.jit(static_argnames=("n",))
def _ref_static_logits(model, b, n):
    return model(b["inputs"], n=n, positions_BT=b["positions"], segment_ids_BT=b["segment_ids"])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_eval_equals_forward_pass(setup):
    _, model, batches = setup
    b = _fwd(batches[0])
    before = depth.TRACES["eval"]
    res = depth.evaluate_depths(model, batches[:1], [1, 3])
    depth.evaluate_depths(model, batches[:1], [3, 2, 1])
    assert depth.TRACES["eval"] - before <= 1  # one program for every depth (traced n)
    for r in res:
        n = r["depth"]
        ref = _ref(model, b, jnp.int32(n))
        want_BTV = np.asarray(ref["logits"])
        np.testing.assert_allclose(depth.logits_at(model, batches[0], n), want_BTV, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["ce"], float(ref["ce"]), rtol=1e-5)
        ok, ex = exact_match(want_BTV.argmax(-1), batches[0])
        assert r["exact_match"] == ok / ex and r["n_examples"] == ex
        assert not r["extrapolated"]


def test_extrapolation_beyond_trained_depth(setup):
    cfg, model, batches = setup
    res = depth.evaluate_depths(model, batches[:1], [2, 5])
    assert [r["extrapolated"] for r in res] == [False, True]
    # Beyond max_iterations: the sweep's max_depth path equals the model's static-depth forward.
    want_BTV = np.asarray(_ref_static_logits(model, _fwd(batches[0]), 5))
    np.testing.assert_allclose(depth.logits_at(model, batches[0], 5), want_BTV, rtol=1e-5, atol=1e-5)
    # Depth 2 inside a max_depth=5 sweep equals depth 2 alone (skipped steps are pass-throughs).
    np.testing.assert_allclose(res[0]["ce"], depth.evaluate_depths(model, batches[:1], [2])[0]["ce"], rtol=1e-6)

    strict = LoopedLM(dataclasses.replace(cfg.model, extrapolation="none"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"depth 6 exceeds model.max_iterations=3.*extrapolation='none'"):
        depth.evaluate_depths(strict, batches[:1], [1, 4, 6])


def test_evaluate_depths_rejects_depth_zero(setup):
    _, model, batches = setup
    with pytest.raises(ValueError, match=r"\b0\b"):  # the message names the bad depth
        depth.evaluate_depths(model, batches[:1], [0, 2])


def _reference_telemetry(h_SBTD, logits_SBTV, targets_BT, h0_BTD):
    s = h_SBTD.shape[0]
    prevs = [h0_BTD, *h_SBTD[:-1]]
    logp = [_log_softmax(x.astype(np.float64)) for x in logits_SBTV]
    norm = np.linalg.norm(h_SBTD, axis=-1)
    cos = np.stack([(h * p).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(p, axis=-1))
                    for h, p in zip(h_SBTD, prevs)])  # fmt: skip
    rel = np.stack([np.linalg.norm(h - p, axis=-1) / np.linalg.norm(p, axis=-1) for h, p in zip(h_SBTD, prevs)])
    kl = np.stack([np.full(targets_BT.shape, np.nan)]
                  + [(np.exp(logp[t - 1]) * (logp[t - 1] - logp[t])).sum(-1) for t in range(1, s)])  # fmt: skip
    ent = np.stack([-(np.exp(lp) * lp).sum(-1) for lp in logp])
    loss = np.stack([-np.take_along_axis(lp, targets_BT[..., None], -1)[..., 0] for lp in logp])
    pred = np.stack([lp.argmax(-1) for lp in logp])
    out = dict(norm=norm, cos_prev=cos, rel_change=rel, kl_prev=kl, entropy=ent, loss=loss,
               correct=pred == targets_BT, pred=pred)  # fmt: skip
    return {k: np.moveaxis(v, 0, -1) for k, v in out.items()}


def test_telemetry_equals_direct_computation(setup):
    cfg, model, batches = setup
    b = _fwd(batches[0])
    n = 3
    ref = _ref(model, b, jnp.int32(n))
    h_SBTD, logits_SBTV, h0_BTD = (np.asarray(ref[k], np.float64) for k in ("h", "lens", "h0"))
    want = _reference_telemetry(h_SBTD[:n], logits_SBTV[:n], batches[0]["targets"], h0_BTD)
    got = depth.model_telemetry(model, batches[0], n)
    for k in want:
        assert got[k].shape == (4, cfg.data.seq_len, n), k
        np.testing.assert_allclose(got[k].astype(np.float64), want[k], rtol=1e-4, atol=1e-4, err_msg=k)
    # Final-iteration loss equals the model's CE at depth n.
    mask_BT = batches[0]["loss_mask"] > 0
    np.testing.assert_allclose(got["loss"][..., -1][mask_BT].mean(), float(ref["ce"]), rtol=1e-5)
    no_h0 = depth.model_telemetry(model, batches[0], n, h0="nan")
    assert np.isnan(no_h0["rel_change"][..., 0]).all() and np.isfinite(got["rel_change"][..., 0]).all()


def test_telemetry_beyond_max_and_batches(setup):
    cfg, model, batches = setup
    tel, stacked = depth.batches_telemetry(model, batches, 5)
    assert tel["kl_prev"].shape == (8, cfg.data.seq_len, 5) and stacked["inputs"].shape[0] == 8
    b = _fwd(batches[1])
    want_BTV = np.asarray(_ref_static_logits(model, b, 5))
    np.testing.assert_array_equal(tel["pred"][4:, :, -1], want_BTV.argmax(-1))
