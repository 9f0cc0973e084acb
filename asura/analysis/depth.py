"""Evaluate a LoopedLM at a list of depths (including past training) and collect telemetry.

Depth n is passed as a traced int32, so one compiled program serves every
depth. Depths beyond ``model.max_iterations`` need ``model.extrapolation``
(last | cycle); they run with a static ``depth_cap = max(depths)`` scan length,
which is then used for *all* depths of the sweep (skipped steps are exact
pass-throughs), so a sweep still compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.analysis import telemetry as tel_lib
from asura.model.depth import scan_cap as depth_cap_for  # one rule for model, train and analysis

TRACES = {"eval": 0, "telemetry": 0}  # trace counters: tests assert one compile per sweep


@nnx.jit(static_argnames=("depth_cap",))
def _eval_step(model, batch, n, depth_cap):
    TRACES["eval"] += 1
    logits_BTV = model(batch["inputs"], n=n, positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
                       depth_cap=depth_cap)  # fmt: skip
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    ce_BT = -jnp.take_along_axis(logp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    return logits_BTV, ce_BT, jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)


def _device_batch(batch: dict) -> dict:
    keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    return {k: jnp.asarray(batch[k]) for k in keys}


def logits_at(model, batch: dict, n: int, depth_cap: int | None = None) -> np.ndarray:
    """Final-iteration logits ``[B, T, V]`` at depth n through the shared compiled program."""
    if depth_cap is None:
        depth_cap = depth_cap_for(model.cfg, [n])
    return np.asarray(_eval_step(model, _device_batch(batch), jnp.int32(n), depth_cap)[0])


def evaluate_depths(model, batches: list[dict], depths) -> list[dict]:
    """Per depth: {depth, loss, token_accuracy, exact_match, n_examples, extrapolated}.

    ``loss`` is the token-weighted mean cross-entropy (no z-loss) of the final
    iteration over all scored targets of all batches; ``exact_match`` is the
    fraction of examples whose every scored target is predicted
    (``asura.data.packing.exact_match``).
    """
    from asura.data.packing import exact_match

    depths = [int(d) for d in depths]
    cap = depth_cap_for(model.cfg, depths)
    dev = [_device_batch(b) for b in batches]
    out = []
    for d in depths:
        ce_sum = n_tok = n_right = n_ok = n_ex = 0.0
        for batch, db in zip(batches, dev, strict=True):
            _, ce_BT, pred_BT = _eval_step(model, db, jnp.int32(d), cap)
            mask_BT = np.asarray(batch["loss_mask"]) > 0
            pred_BT = np.asarray(pred_BT)
            ce_sum += float(np.where(mask_BT, np.asarray(ce_BT), 0.0).sum())
            n_tok += float(mask_BT.sum())
            n_right += float((mask_BT & (pred_BT == np.asarray(batch["targets"]))).sum())
            ok, ex = exact_match(pred_BT, batch)
            n_ok, n_ex = n_ok + ok, n_ex + ex
        out.append(
            {
                "depth": d,
                "loss": ce_sum / max(n_tok, 1.0),
                "token_accuracy": n_right / max(n_tok, 1.0),
                "exact_match": n_ok / max(n_ex, 1.0),
                "n_examples": int(n_ex),
                "extrapolated": d > model.cfg.max_iterations,
            }
        )
    return out


@nnx.jit(static_argnames=("depth_cap", "with_h0"))
def _telemetry_step(model, batch, n, depth_cap, with_h0):
    TRACES["telemetry"] += 1
    tokens_BT = batch["inputs"]
    h_SBTD = model.latents(
        tokens_BT, n=n, positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"], depth_cap=depth_cap
    )
    # h_0 = e: the loop's initial carry is the embedding (see asura.model.looped).
    h0_BTD = model.embed[...][tokens_BT].astype(h_SBTD.dtype) if with_h0 else None
    return tel_lib.scan_telemetry(h_SBTD, batch["targets"], h0_BTD, model.head)


def model_telemetry(model, batch: dict, n: int, h0: str = "embedding") -> dict[str, np.ndarray]:
    """Telemetry ``{key: [B, T, n]}`` of one batch at depth n (see ``asura.analysis.telemetry``).

    ``h0='embedding'`` compares h_1 with h_0 = Emb(tokens) (the loop's initial
    state); ``h0='nan'`` leaves t=1's latent change undefined (NaN).
    """
    if h0 not in ("embedding", "nan"):
        raise ValueError(f"h0 must be 'embedding' or 'nan', got {h0!r}")
    cap = depth_cap_for(model.cfg, [n])
    outs = _telemetry_step(model, _device_batch(batch), jnp.int32(n), cap, h0 == "embedding")
    # The scan covers S >= n steps; steps past n repeat h_n, so keep the first n.
    return {k: v[..., :n] for k, v in tel_lib.to_dict(outs).items()}


def batches_telemetry(model, batches: list[dict], n: int, h0: str = "embedding") -> tuple[dict, dict]:
    """Telemetry over several batches concatenated along B, and the matching stacked batch."""
    tel = tel_lib.concat([model_telemetry(model, b, n, h0) for b in batches])
    keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    stacked = {k: np.concatenate([np.asarray(b[k]) for b in batches], axis=0) for k in keys}
    return tel, stacked
