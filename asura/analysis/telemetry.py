"""Per-token, per-iteration telemetry of a looped model's latents.

Pure functions over arrays: ``h_SBTD`` holds every iteration's latent (S
iterations, t = 1..S along axis 0) and ``head_fn`` maps a latent ``h_BTD`` to
logits ``[B, T, V]`` (the model's shared final norm + unembedding: the logit
lens). Every output is a numpy array ``[B, T, S]`` whose last axis is the
iteration t = 1..S.

Conventions
- "previous" of iteration t=1: the latent telemetry (``cos_prev``,
  ``rel_change``) compares h_1 with ``h0_BTD`` when one is given (the
  loop's start h_0: e, or 0 with model.loop_start=zero) and is NaN otherwise. ``kl_prev`` at t=1 is
  always NaN (no predictive distribution precedes the first iteration). NaN
  never satisfies an exit threshold, so change-based exits start at t=2.
- ``kl_prev[t] = KL(p_{t-1} || p_t)``, Huginn's convention
  (``F.kl_div(log p_t, log p_{t-1}, log_target=True)``), in nats.
- ``entropy``, ``loss`` (token cross-entropy, no z-loss) and ``correct``
  (argmax == target) are per iteration through the shared head, in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("norm", "cos_prev", "rel_change", "kl_prev", "entropy", "loss", "correct", "pred")
_TINY = 1e-12  # guards 0/0 on all-zero latents only; far below any real norm


def _latent_step(h_BTD, prev_BTD):
    norm_BT = jnp.linalg.norm(h_BTD, axis=-1)
    prev_norm_BT = jnp.linalg.norm(prev_BTD, axis=-1)
    cos_BT = jnp.sum(h_BTD * prev_BTD, axis=-1) / jnp.maximum(norm_BT * prev_norm_BT, _TINY)
    rel_BT = jnp.linalg.norm(h_BTD - prev_BTD, axis=-1) / jnp.maximum(prev_norm_BT, _TINY)
    return norm_BT, cos_BT, rel_BT


def _logit_step(logits_BTV, prev_logp_BTV, targets_BT):
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    p_BTV = jnp.exp(logp_BTV)
    entropy_BT = -jnp.sum(p_BTV * logp_BTV, axis=-1)
    kl_BT = jnp.sum(jnp.exp(prev_logp_BTV) * (prev_logp_BTV - logp_BTV), axis=-1)
    loss_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    pred_BT = jnp.argmax(logp_BTV, axis=-1).astype(jnp.int32)
    return logp_BTV, entropy_BT, kl_BT, loss_BT, pred_BT


def scan_telemetry(h_SBTD, targets_BT, h0_BTD, head_fn):
    """Jit-able core: tuple of ``[S, B, T]`` arrays in ``KEYS`` order (use ``to_dict`` on the result)."""
    h_SBTD = h_SBTD.astype(jnp.float32)
    has_h0 = h0_BTD is not None
    prev0_BTD = h0_BTD.astype(jnp.float32) if has_h0 else h_SBTD[0]
    logp0_BTV = jax.nn.log_softmax(head_fn(h_SBTD[0]).astype(jnp.float32), axis=-1)

    # Scan so only one iteration's logits [B, T, V] are live at a time.
    def step(carry, xs):
        prev_BTD, prev_logp_BTV = carry
        t, h_BTD = xs
        norm_BT, cos_BT, rel_BT = _latent_step(h_BTD, prev_BTD)
        logp_BTV, ent_BT, kl_BT, loss_BT, pred_BT = _logit_step(head_fn(h_BTD), prev_logp_BTV, targets_BT)
        first = t == 0
        nan = jnp.float32(jnp.nan)
        if not has_h0:
            cos_BT = jnp.where(first, nan, cos_BT)
            rel_BT = jnp.where(first, nan, rel_BT)
        kl_BT = jnp.where(first, nan, kl_BT)
        out = (norm_BT, cos_BT, rel_BT, kl_BT, ent_BT, loss_BT, pred_BT == targets_BT, pred_BT)
        return (h_BTD, logp_BTV), out

    ts = jnp.arange(h_SBTD.shape[0])
    _, outs = jax.lax.scan(step, (prev0_BTD, logp0_BTV), (ts, h_SBTD))
    return outs


def to_dict(outs) -> dict[str, np.ndarray]:
    """``scan_telemetry`` output -> ``{key: [B, T, S]}`` numpy arrays."""
    return {k: np.moveaxis(np.asarray(v), 0, -1) for k, v in zip(KEYS, outs, strict=True)}


def telemetry(
    h_SBTD,
    head_fn: Callable,
    targets_BT,
    h0_BTD=None,
    n: int | None = None,
) -> dict[str, np.ndarray]:
    """Telemetry dict of ``[B, T, n]`` arrays (keys: ``KEYS``); see the module docstring.

    ``n`` keeps the first n iterations (latents past the requested depth are
    scan padding). Runs eagerly; for a model use ``asura.analysis.depth.model_telemetry``,
    which jits latents + telemetry together.
    """
    if n is not None:
        if not 1 <= n <= h_SBTD.shape[0]:
            raise ValueError(f"n={n} outside the {h_SBTD.shape[0]} latents given")
        h_SBTD = h_SBTD[:n]
    targets_BT = jnp.asarray(targets_BT, jnp.int32)
    h0_BTD = None if h0_BTD is None else jnp.asarray(h0_BTD)
    return to_dict(scan_telemetry(jnp.asarray(h_SBTD), targets_BT, h0_BTD, head_fn))


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate telemetry dicts from several batches along B (same T and n)."""
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def masked_mean(x_BTN: np.ndarray, mask_BT) -> np.ndarray:
    """Mean over scored tokens for each iteration -> ``[n]`` (NaNs propagate)."""
    m_BT1 = (np.asarray(mask_BT) > 0)[..., None]
    return (np.where(m_BT1, x_BTN, 0.0)).sum((0, 1)) / max(m_BT1.sum(), 1)


def summary(tel: dict[str, np.ndarray], mask_BT) -> dict[str, np.ndarray]:
    """Per-iteration means over scored tokens of every float telemetry key -> ``{key: [n]}``."""
    return {k: masked_mean(v.astype(np.float64), mask_BT) for k, v in tel.items() if k != "pred"}
