"""Exit rules for per-token halting: when a token stops iterating.

A rule reads one token's successive iterations and yields a value per token; the token exits
after iteration t when the value crosses the threshold (below it, or at/above it for counts).
The training-free rules are Huginn's (Geiping et al. 2025, arXiv 2502.05171; the released
``raven_modeling_minimal.py`` exit evaluators), with their initial states and default
thresholds, so iteration 1 is compared with what precedes the loop:

- ``latent``:  ‖h_t − h_{t−1}‖ / ‖h_t‖, h_0 the loop start (Huginn "latent-diff", 0.03)
- ``kl``:      KL(p_{t−1} ‖ p_t) of the output distributions, p_0 uniform (Huginn "kl", 1e-3)
- ``entropy_diff``: |H(p_t) − H(p_{t−1})|, H_0 = 100 (Huginn "entropy-diff", 1e-3)
- ``entropy``: H(p_t) itself (confident enough: asura.analysis.exits' simulated ``entropy``)
- ``argmax``:  iterations the argmax has not changed, argmax_0 = none (Huginn
               "argmax-stability", 5; exits at ≥ threshold)
- ``gate``:    the learned exit gate's cumulative exit probability 1 − Π_{j<=t}(1 − λ_j), exits at
               ≥ threshold (Ouro, arXiv 2510.25741; needs model.exit_gate)
- ``steps``:   t itself (exit after ``threshold`` iterations): the parity rule, depth k exactly
- ``never``:   no exit: the full depth through the halting path

Pure functions over [B, T] tokens; ``asura.model.halting`` applies them inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from asura.registry import Registry


@dataclass(frozen=True)
class ExitRule:
    doc: str
    init: Callable[[jax.Array, int], Any]  # (h0_BTD, vocab) -> state
    # (state, h_prev_BTD, h_BTD, model, t) -> (state, value_BT); t is the 0-based iteration just run;
    # model: the LoopedLM (its head, its exit gate)
    update: Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[Any, jax.Array]]
    exit_below: bool  # exit when value < threshold (else when value >= threshold)
    default_threshold: float | None  # Huginn's default where the rule is theirs
    needs_logits: bool  # the rule runs the head every iteration (a B·T·V cost per step)
    needs_gate: bool = False  # the rule reads the learned exit gate (model.exit_gate)

    def exits(self, value_BT: jax.Array, threshold) -> jax.Array:
        return value_BT < threshold if self.exit_below else value_BT >= threshold


EXIT_RULES: Registry[ExitRule] = Registry("exit rule", "when a token stops iterating (asura.model.exits)")


def _zeros_BT(h_BTD):
    return jnp.zeros(h_BTD.shape[:2], jnp.float32)


def _log_probs(model, h_BTD) -> jax.Array:
    return jax.nn.log_softmax(model.head(h_BTD).astype(jnp.float32), axis=-1)


def _latent(state, h_prev, h, model, t):
    h32, prev32 = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    return (), jnp.linalg.norm(h32 - prev32, axis=-1) / jnp.linalg.norm(h32, axis=-1)


def _kl(prev_logp_BTV, h_prev, h, model, t):
    logp_BTV = _log_probs(model, h)
    return logp_BTV, jnp.sum(jnp.exp(prev_logp_BTV) * (prev_logp_BTV - logp_BTV), axis=-1)


def _entropy_BT(model, h):
    logp_BTV = _log_probs(model, h)
    return -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)


def _entropy_diff(prev_H_BT, h_prev, h, model, t):
    H_BT = _entropy_BT(model, h)
    return H_BT, jnp.abs(H_BT - prev_H_BT)


def _argmax(state, h_prev, h, model, t):
    prev_BT, stable_BT = state
    top_BT = jnp.argmax(model.head(h), axis=-1).astype(jnp.int32)
    stable_BT = jnp.where(top_BT == prev_BT, stable_BT + 1, 0)
    return (top_BT, stable_BT), stable_BT.astype(jnp.float32)


EXIT_RULES.add("never", ExitRule(
    "no exit: every token runs the full depth (the halting path's parity rule; its threshold is ignored)",
    lambda h0, V: (), lambda s, hp, h, model, t: ((), _zeros_BT(h) - jnp.inf), False, float("inf"), False,
))  # fmt: skip
EXIT_RULES.add("steps", ExitRule(
    "exit after `threshold` iterations (depth k exactly: the parity rule for a fixed depth)",
    lambda h0, V: (), lambda s, hp, h, model, t: ((), _zeros_BT(h) + (t + 1)), False, None, False,
))  # fmt: skip
EXIT_RULES.add("latent", ExitRule(
    "relative latent change ‖h_t − h_{t−1}‖/‖h_t‖ below threshold (Huginn latent-diff)",
    lambda h0, V: (), _latent, True, 0.03, False,
))  # fmt: skip
EXIT_RULES.add("kl", ExitRule(
    "KL(p_{t−1} ‖ p_t) between successive output distributions below threshold, p_0 uniform (Huginn kl)",
    lambda h0, V: jnp.full((*h0.shape[:2], V), -jnp.log(V), jnp.float32), _kl, True, 1e-3, True,
))  # fmt: skip
EXIT_RULES.add("entropy_diff", ExitRule(
    "change in output entropy |H_t − H_{t−1}| below threshold, H_0 = 100 (Huginn entropy-diff)",
    lambda h0, V: jnp.full(h0.shape[:2], 100.0, jnp.float32), _entropy_diff, True, 1e-3, True,
))  # fmt: skip
EXIT_RULES.add("entropy", ExitRule(
    "output entropy H(p_t) below threshold, in nats (asura.analysis.exits' simulated entropy rule)",
    lambda h0, V: (), lambda s, hp, h, model, t: ((), _entropy_BT(model, h)), True, None, True,
))  # fmt: skip
EXIT_RULES.add("argmax", ExitRule(
    "the output argmax unchanged for `threshold` successive iterations (Huginn argmax-stability)",
    lambda h0, V: (jnp.full(h0.shape[:2], -1, jnp.int32), jnp.zeros(h0.shape[:2], jnp.int32)),
    _argmax, False, 5, True,
))  # fmt: skip


def _gate(survival_BT, h_prev, h, model, t):
    survival_BT = survival_BT * (1.0 - model.exit_prob(h))
    return survival_BT, 1.0 - survival_BT


EXIT_RULES.add("gate", ExitRule(
    "the learned exit gate's cumulative exit probability at or above threshold (Ouro; model.exit_gate)",
    lambda h0, V: jnp.ones(h0.shape[:2], jnp.float32), _gate, False, None, False, True,
))  # fmt: skip
