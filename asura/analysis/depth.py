"""Evaluate a LoopedLM at a list of depths (including past training) and collect telemetry.

Depth n is passed as a traced int32, so one compiled program serves every depth. Depths
beyond ``model.max_iterations`` need ``model.extrapolation`` (last | cycle); the loop length
is ``asura.depth.scan_length`` of the largest depth asked for, used for *all* depths of the
sweep (skipped steps are exact pass-throughs), so a sweep still compiles once. Evaluation is
``asura.train.evaluate`` (the same code and metric names as training).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from asura.analysis import telemetry as tel_lib
from asura.depth import scan_length
from asura.train.evaluate import eval_step
from asura.train.evaluate import evaluate_depths as _evaluate_depths

TRACES = {"eval": 0, "telemetry": 0}  # trace counters: tests assert one compile per sweep
_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@nnx.jit(static_argnames=("max_depth",))
def _eval_step(model, batch, n, max_depth):
    TRACES["eval"] += 1
    return eval_step(model, batch, n, max_depth)


@nnx.jit(static_argnames=("max_depth",))
def _logits_step(model, batch, n, max_depth):
    return model(batch["inputs"], n=n, positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
                 max_depth=max_depth)  # fmt: skip


def _device_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in _KEYS}


def logits_at(model, batch: dict, n: int, max_depth: int | None = None) -> np.ndarray:
    """Final-iteration logits ``[B, T, V]`` at depth n through the shared compiled program."""
    return np.asarray(_logits_step(model, _device_batch(batch), jnp.int32(n), max(n, max_depth or n)))


def evaluate_depths(model, batches: list[dict], depths) -> list[dict]:
    """Per depth: {depth, ce, accuracy, exact_match, objective, z_loss, n_examples, extrapolated}.

    Metric names and meanings are asura.train.evaluate's (``ce`` is the final iteration's
    cross-entropy over scored tokens, no z-loss; ``objective`` the training objective).
    """
    from asura.data.packing import exact_match

    depths = [int(d) for d in depths]
    top = scan_length(model.cfg, depths)  # the depth rule: rejects depth < 1 and depths it cannot run
    dev = [_device_batch(b) for b in batches]
    by_depth = _evaluate_depths(lambda b, n: _eval_step(model, b, n, top), batches, depths, exact_match, placed=dev)
    out = []
    for d in depths:
        r = by_depth[d]
        out.append({
            "depth": d, "ce": r["ce"], "accuracy": r["accuracy"], "exact_match": r["exact_match"],
            "objective": r["objective"], "z_loss": r["z_loss"], "n_examples": int(r["examples"]),
            "extrapolated": d > model.cfg.max_iterations,
        })  # fmt: skip
    return out


@nnx.jit(static_argnames=("max_depth", "with_h0"))
def _telemetry_step(model, batch, n, max_depth, with_h0):
    TRACES["telemetry"] += 1
    tokens_BT = batch["inputs"]
    h_SBTD = model.latents(
        tokens_BT, n=n, positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"], max_depth=max_depth
    )
    # h_0: the loop's initial carry (the embedding, or zeros with model.loop_start=zero).
    h0_BTD = model.h0(model.embed[...][tokens_BT].astype(h_SBTD.dtype)) if with_h0 else None
    return tel_lib.scan_telemetry(h_SBTD, batch["targets"], h0_BTD, model.head)


def model_telemetry(model, batch: dict, n: int, h0: str = "embedding") -> dict[str, np.ndarray]:
    """Telemetry ``{key: [B, T, n]}`` of one batch at depth n (see ``asura.analysis.telemetry``).

    ``h0='embedding'`` compares h_1 with h_0 = Emb(tokens) (the loop's initial
    state); ``h0='nan'`` leaves t=1's latent change undefined (NaN).
    """
    if h0 not in ("embedding", "nan"):
        raise ValueError(f"h0 must be 'embedding' or 'nan', got {h0!r}")
    outs = _telemetry_step(model, _device_batch(batch), jnp.int32(n), n, h0 == "embedding")
    # The scan covers S >= n steps; steps past n repeat h_n, so keep the first n.
    return {k: v[..., :n] for k, v in tel_lib.to_dict(outs).items()}


def batches_telemetry(model, batches: list[dict], n: int, h0: str = "embedding") -> tuple[dict, dict]:
    """Telemetry over several batches concatenated along B, and the matching stacked batch."""
    tel = tel_lib.concat([model_telemetry(model, b, n, h0) for b in batches])
    stacked = {k: np.concatenate([np.asarray(b[k]) for b in batches], axis=0) for k in _KEYS}
    return tel, stacked


@nnx.jit(static_argnames=("max_depth",))
def _exit_step(model, batch, n, max_depth, halt):
    _, aux = model.loss(batch, n=n, max_depth=max_depth, with_pred=True, halt=halt)
    metrics = {"ce": aux["ce"], "accuracy": aux["accuracy"], "tokens": aux["tokens"]}
    return metrics, aux["pred"], aux["depth_BT"]


def evaluate_exits(model, cfg, batches: list[dict], n: int, specs) -> list[dict]:
    """Per exit rule and threshold (asura.model.halting.HaltSpec) at depth n: ce, accuracy and
    exact_match with every token scored at its own exit (asura.train.evaluate's meanings), the
    exit depths (mean over the real tokens, prompt included: each one runs through the loop; and
    over the scored tokens), their pmf, and the executed forward FLOPs per token
    (asura.flops.executed_flops) next to the fixed depth n's: under kv=full every token runs all n
    iterations (exited ones for the others' sake), so nothing is saved there. One program per rule serves every
    threshold (the threshold is a traced leaf of the spec). cfg: the run's Config (its seq_len
    prices attention)."""
    from asura.data.packing import exact_match
    from asura.flops import executed_flops

    top = scan_length(model.cfg, [n])
    dev = [_device_batch(b) for b in batches]
    fixed = executed_flops(cfg, {n: 1.0})
    rows = []
    for spec in specs:
        ce = acc = tokens = correct = examples = 0.0
        counts, scored_depth, scored = np.zeros(top + 1), 0.0, 0.0
        for host, b in zip(batches, dev, strict=True):
            metrics, pred_BT, depth_BT = _exit_step(model, b, jnp.int32(n), top, spec)
            t = float(metrics["tokens"])
            ce, acc, tokens = ce + float(metrics["ce"]) * t, acc + float(metrics["accuracy"]) * t, tokens + t
            c, e = exact_match(np.asarray(pred_BT), host)
            correct, examples = correct + float(c), examples + float(e)
            depth_BT, mask_BT = np.asarray(depth_BT), np.asarray(host["loss_mask"]) > 0
            counts += np.bincount(depth_BT[np.asarray(host["segment_ids"]) > 0], minlength=top + 1)
            scored_depth, scored = scored_depth + float(depth_BT[mask_BT].sum()), scored + float(mask_BT.sum())
        pmf = {d: float(c / counts.sum()) for d, c in enumerate(counts) if c > 0}
        # kv=full keeps every token iterating for the others: nothing is saved (an upper bound: the
        # loop stops at n or when a batch's last token exits)
        ran = pmf if spec.kv == "copy" else {n: 1.0}
        flops = executed_flops(cfg, ran, rule_head=spec.entry.needs_logits, rule_gate=spec.entry.needs_gate)
        rows.append({
            "rule": spec.rule, "threshold": float(spec.tau) if np.isfinite(spec.tau) else None, "kv": spec.kv,
            "depth": n,
            "ce": ce / max(tokens, 1.0), "accuracy": acc / max(tokens, 1.0),
            "exact_match": correct / max(examples, 1.0), "n_examples": int(examples),
            "mean_depth": sum(d * p for d, p in pmf.items()), "mean_depth_scored": scored_depth / max(scored, 1.0),
            "depth_pmf": pmf, "flops_per_token": flops, "flops_ratio": flops / fixed,
        })  # fmt: skip
    return rows
