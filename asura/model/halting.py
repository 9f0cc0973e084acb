"""Per-token halting inside the depth loop: each token stops iterating when its exit rule fires.

Semantics (one definition, used by the training drivers, the unrolled reference and the KV-cached
decoder): a token active at iteration t runs it; then its exit rule (``asura.model.exits``) reads
its iterations t−1 and t, and it leaves the loop when the rule fires (never before ``min_depth``).
An exited token's latent stays at its last computed iteration (its output); the loop ends when no
token is active or at the depth n, so ``depth_BT`` counts the iterations each token ran.

What later iterations of *other* tokens read from an exited token (``kv``):

copy  its keys/values of its last computed iteration, per layer: the state carried forward.
      Nothing of it is computed again, so the decoder saves the whole iteration (asura.infer).
full  it keeps iterating for the others' sake and only its output is picked at its exit (Ouro's
      released forward): every other token sees exactly the fixed-depth model. It saves nothing;
      the quality gap between the two is the cost of copying.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from asura.config.schema import CHOICES
from asura.model.exits import EXIT_RULES, ExitRule

KV_MODES = CHOICES["depth.halt_kv"]  # listed once, with the config key that trains under halting


@functools.partial(jax.tree_util.register_dataclass, data_fields=["threshold"], meta_fields=["rule", "kv", "min_depth"])
@dataclass(frozen=True)
class HaltSpec:
    """Which exit rule, at which threshold. A pytree whose one leaf is the threshold: passed to a
    jitted function, one program serves every threshold of a rule (the rest is static)."""

    rule: str
    threshold: float | None = None  # None: the rule's default (Huginn's)
    kv: str = "copy"
    min_depth: int = 1

    def __post_init__(self):
        # Only the static fields: jax rebuilds a spec with its threshold leaf replaced (e.g. by None).
        EXIT_RULES[self.rule]  # one-line error naming the valid rules
        if self.kv not in KV_MODES:
            raise ValueError(f"halting kv={self.kv!r} is not valid; choose one of {', '.join(KV_MODES)}")
        if self.min_depth < 1:
            raise ValueError(f"halting min_depth must be >= 1, got {self.min_depth}")

    @property
    def entry(self) -> ExitRule:
        return EXIT_RULES[self.rule]

    @property
    def tau(self):
        if self.threshold is not None:
            return self.threshold
        if self.entry.default_threshold is None:
            raise ValueError(f"exit rule {self.rule!r} has no default threshold; give one")
        return self.entry.default_threshold


class Halt(NamedTuple):
    """LoopCarry.state while halting."""

    active_BT: jax.Array  # bool: the token still iterates
    depth_BT: jax.Array  # int32: iterations the token has run
    rule: Any  # the exit rule's state
    k_LBTKH: jax.Array | None  # kv=copy: per layer, keys/values of each token's last computed iteration
    v_LBTKH: jax.Array | None
    out_BTD: jax.Array | None  # kv=full: each token's latent at its exit (the carry's h runs on)


def select(active_BT, new, old):
    """Per token: new where active, else old (every leaf [B, T, ...])."""

    def pick(n, o):
        return jnp.where(active_BT.reshape(active_BT.shape + (1,) * (n.ndim - 2)), n, o)

    return jax.tree.map(pick, new, old)


def select_LBT(active_BT, new_LBTKH, old_LBTKH):
    """select over a leading layer axis: [L, B, T, K, H]."""
    return jnp.where(active_BT[None, :, :, None, None], new_LBTKH, old_LBTKH)


def parse_specs(values: list[str], kv: str = "copy", flag: str = "--exit") -> list[HaltSpec]:
    """['latent:0.03,0.1', 'kl'] -> HaltSpecs, one per threshold; a ValueError (one line naming `flag`)
    for a bad rule, threshold or kv. The command-line form of every tool that takes exit rules."""
    if kv not in KV_MODES:
        raise ValueError(f"{flag}-kv={kv!r} is not valid; choose one of {', '.join(KV_MODES)}")
    specs = []
    for v in values:
        rule, _, ths = v.partition(":")
        if rule not in EXIT_RULES:
            raise ValueError(f"{flag} {v!r}: {EXIT_RULES.invalid(rule)}")
        try:
            taus = [float(x) for x in ths.split(",")] if ths else [None]
        except ValueError:
            raise ValueError(f"{flag} {v!r}: thresholds must be numbers, e.g. {rule}:0.01,0.1") from None
        if None in taus and EXIT_RULES[rule].default_threshold is None:
            raise ValueError(f"{flag} {v!r}: rule {rule!r} has no default threshold; give one, e.g. {rule}:2")
        specs += [HaltSpec(rule, t, kv=kv) for t in taus]
    return specs


def train_spec(depth) -> HaltSpec | None:
    """The halting a run trains under (depth.halt_rule, DepthConfig); None when it is off."""
    if not depth.halt_rule:
        return None
    return HaltSpec(depth.halt_rule, depth.halt_threshold or None, depth.halt_kv)


def init(spec: HaltSpec, h0_BTD, vocab: int, kv_shape: tuple | None, kv_dtype, real_BT=None) -> Halt:
    """real_BT: the positions that iterate (padding, segment 0, starts exited at depth 0: it would
    otherwise keep the loop running for nothing)."""
    B, T = h0_BTD.shape[:2]
    zeros = None if kv_shape is None or spec.kv != "copy" else jnp.zeros(kv_shape, kv_dtype)
    out = h0_BTD if spec.kv == "full" else None
    rule = spec.entry.init(h0_BTD, vocab)
    active = jnp.ones((B, T), bool) if real_BT is None else jnp.asarray(real_BT, bool)
    return Halt(active, jnp.zeros((B, T), jnp.int32), rule, zeros, zeros, out)


def advance(spec: HaltSpec, halt: Halt, h_prev_BTD, h_new_BTD, model, t, kv=None) -> tuple[jax.Array, Halt]:
    """After iteration t ran for every token: keep it for the active ones (kv=copy: the carry; full:
    the picked output), count it, run the rule, drop the tokens it exits. kv: this iteration's
    (k_LBTKH, v_LBTKH) under kv=copy."""
    active = halt.active_BT
    out = halt.out_BTD
    if spec.kv == "full":
        h_BTD, out = h_new_BTD, select(active, h_new_BTD, out)
    else:
        h_BTD = select(active, h_new_BTD, h_prev_BTD)
    # the rule only decides who stops, which is not differentiated: no backward through it (nor residuals)
    sg = jax.lax.stop_gradient
    rule, value_BT = spec.entry.update(sg(halt.rule), sg(h_prev_BTD), sg(h_new_BTD), model, t)
    rule = select(active, rule, halt.rule)
    depth_BT = halt.depth_BT + active.astype(jnp.int32)
    leave_BT = spec.entry.exits(value_BT, spec.tau) & (depth_BT >= spec.min_depth)
    k, v = halt.k_LBTKH, halt.v_LBTKH
    if kv is not None and k is not None:
        k, v = select_LBT(active, kv[0], k), select_LBT(active, kv[1], v)
    return h_BTD, Halt(active & ~leave_BT, depth_BT, rule, k, v, out)


def output(halt: Halt, h_BTD):
    """Each token's latent at its exit: the carry itself under kv=copy."""
    return h_BTD if halt.out_BTD is None else halt.out_BTD


def offered(halt: Halt, layer: int, k_BTKH, v_BTKH):
    """The keys/values a layer offers the other tokens under kv=copy: an exited token's are those of
    its last computed iteration (the forward and the KV-cached decoder both read them here)."""
    a_BT11 = halt.active_BT[:, :, None, None]
    k_old, v_old = halt.k_LBTKH[layer].astype(k_BTKH.dtype), halt.v_LBTKH[layer].astype(v_BTKH.dtype)
    return jnp.where(a_BT11, k_BTKH, k_old), jnp.where(a_BT11, v_BTKH, v_old)


def any_active(halt: Halt) -> jax.Array:
    return jnp.any(halt.active_BT)
