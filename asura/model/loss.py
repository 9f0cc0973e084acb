"""Cross-entropy pieces: fp32 token statistics (whole or vocabulary-chunked),
masked means, and latent-guidance weights for a traced depth n.

`token_stats` returns, per token, logsumexp, the target logit and the max
logit. From those: CE = lse − target, z-loss = lse², correct = target ≥ max.
The chunked path scans over vocabulary chunks with an online logsumexp and a
checkpointed body, so neither the forward nor the backward pass ever holds a
full B×T×V array: the backward recomputes one chunk's logits at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from asura.config.schema import ModelConfig
from asura.model.layers import dense, f32


def _full_stats(h_BTD, w_DV, targets_BT):
    logits_BTV = dense(h_BTD, w_DV.astype(h_BTD.dtype), f32(h_BTD.dtype))
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT, tgt_BT, logits_BTV.max(-1)


def _chunked_stats(h_BTD, w_DV, targets_BT, chunk: int):
    D, V = w_DV.shape
    n_chunks = V // chunk
    w_CDc = w_DV.reshape(D, n_chunks, chunk).transpose(1, 0, 2)

    def body(carry, xs):
        m_BT, s_BT, tgt_BT = carry
        w_Dc, i = xs
        logits_BTc = dense(h_BTD, w_Dc.astype(h_BTD.dtype), f32(h_BTD.dtype))
        # The running max only stabilises exp(); lse does not depend on it, so
        # it needs no gradient.
        m_new = jax.lax.stop_gradient(jnp.maximum(m_BT, logits_BTc.max(-1)))
        s_BT = s_BT * jnp.exp(m_BT - m_new) + jnp.exp(logits_BTc - m_new[..., None]).sum(-1)
        local_BT = targets_BT - i * chunk
        hit_BT = (local_BT >= 0) & (local_BT < chunk)
        picked = jnp.take_along_axis(logits_BTc, jnp.clip(local_BT, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        return (m_new, s_BT, tgt_BT + jnp.where(hit_BT, picked, 0.0)), None

    B, T = targets_BT.shape
    dt = f32(h_BTD.dtype)
    init = (jnp.full((B, T), -jnp.inf, dt), jnp.zeros((B, T), dt), jnp.zeros((B, T), dt))
    body = jax.checkpoint(body, prevent_cse=False)
    (m_BT, s_BT, tgt_BT), _ = jax.lax.scan(body, init, (w_CDc, jnp.arange(n_chunks)))
    return m_BT + jnp.log(s_BT), tgt_BT, m_BT


def token_stats(h_BTD, w_DV, targets_BT, chunk: int = 0):
    """(lse_BT, target_logit_BT, max_logit_BT) in fp32 for normed latents h."""
    if chunk and chunk < w_DV.shape[1]:
        return _chunked_stats(h_BTD, w_DV, targets_BT, chunk)
    return _full_stats(h_BTD, w_DV, targets_BT)


class Score(NamedTuple):
    """One iteration's masked token means: cross-entropy, lse² (the z-loss term) and accuracy."""

    ce: jax.Array
    z: jax.Array
    acc: jax.Array


def masked_mean(x_BT, mask_BT):
    return jnp.sum(x_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def token_scores(h_BTD, w_DV, targets_BT, chunk: int = 0) -> Score:
    """Per token Score(ce_BT, lse²_BT, correct_BT) for one iteration's normed latents."""
    lse_BT, tgt_BT, max_BT = token_stats(h_BTD, w_DV, targets_BT, chunk)
    return Score(lse_BT - tgt_BT, lse_BT * lse_BT, (tgt_BT >= max_BT).astype(lse_BT.dtype))


def scores(h_BTD, w_DV, targets_BT, mask_BT, chunk: int = 0) -> Score:
    """Masked-mean Score(ce, lse², accuracy) scalars for one iteration's latents."""
    tok = token_scores(h_BTD, w_DV, targets_BT, chunk)
    return Score(*(masked_mean(x_BT, mask_BT) for x_BT in tok))


def exit_distribution(lam_BT, survival_BT, last):
    """(p_BT, survival after): the probability of exiting after this iteration, λ·S (all of the
    remaining survival S at the last iteration), and S·(1 − λ)."""
    return jnp.where(last, survival_BT, lam_BT * survival_BT), survival_BT * (1.0 - lam_BT)


def entropy_terms(p_BT):
    """−p·log p per token (0 at p = 0)."""
    return -p_BT * jnp.log(jnp.where(p_BT > 0, p_BT, 1.0))


def guidance_weights(cfg: ModelConfig, n, S: int, slot_fn=None) -> jax.Array:
    """w_S over the S scan steps for a (possibly traced) depth n: zero for
    t >= n, summing to 1 over the n iterations run.

    none: final iteration only; uniform: 1/n; linear: ∝ t (1-based);
    explicit: guidance_weights[slot(t)] renormalised over the first n
    (slot_fn maps a step past max_iterations to its extrapolated slot).
    """
    t_S = jnp.arange(S)
    n = jnp.asarray(n, jnp.int32)
    live_S = (t_S < n).astype(jnp.float32)
    final_S = (t_S == n - 1).astype(jnp.float32)
    if cfg.guidance == "none":
        return final_S
    if cfg.guidance == "uniform":
        w_S = live_S
    elif cfg.guidance == "linear":
        w_S = (t_S + 1) * live_S
    elif cfg.guidance == "explicit":
        slot_S = slot_fn(t_S) if slot_fn is not None else jnp.minimum(t_S, len(cfg.guidance_weights) - 1)
        w_S = jnp.asarray(cfg.guidance_weights, jnp.float32)[slot_S] * live_S
    else:
        raise ValueError(f"unknown guidance {cfg.guidance!r}")
    total = w_S.sum()
    # Explicit weights like (0, 0, 1) give no mass to a short run: fall back to the final iteration.
    return jnp.where(total > 0, w_S / jnp.where(total > 0, total, 1.0), final_S)
