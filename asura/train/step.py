"""Jitted train and eval steps (pure functions of the state pytree).

* depth `n` is a traced int32, so every depth shares one compiled program;
* gradient accumulation scans over `grad_accum` microbatches and weights each by
  its scored-token count, so the result equals the full-batch gradient of a
  token-mean loss (up to float summation order);
* a non-finite loss or gradient norm keeps params and optimiser state unchanged
  (selected with jnp.where inside the step) and bumps the NaN counters;
* `poison` multiplies the loss: 1.0 normally, NaN to inject a fault in tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from asura.config import Config
from asura.model.depth import depth_cap, scan_cap
from asura.train.evaluate import eval_depths
from asura.train.optim import lr_schedule, make_optimizer
from asura.train.state import merge_model

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _loss_and_grads(cfg: Config, graphdef, rest):
    bptt_k = cfg.depth.bptt_k
    cap = scan_cap(cfg.model, [depth_cap(cfg)])  # sampled depths past max_iterations (extrapolation)

    def loss_fn(params, batch, n, poison):
        model = merge_model(graphdef, params, rest)
        loss, aux = model.loss(batch, n=n, bptt_k=bptt_k, depth_cap=cap)
        return loss * poison, aux

    return jax.value_and_grad(loss_fn, has_aux=True)


def _split_aux(aux: dict) -> tuple[dict, jax.Array]:
    """(token-mean metrics, scored-token count) from the model's aux dict."""
    tokens = jnp.asarray(aux["tokens"], jnp.float32)
    means = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "tokens"}
    return means, tokens


def accumulated_grads(cfg: Config, graphdef, rest, params, batch, n, poison):
    """(loss, aux, grads) over the global batch, scanning grad_accum microbatches."""
    vg = _loss_and_grads(cfg, graphdef, rest)
    accum = cfg.train.grad_accum
    if accum == 1:
        (loss, aux), grads = vg(params, batch, n, poison)
        return loss, aux, grads

    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
        (loss, aux), grads = vg(params, mb, n, poison)
        means, tokens = _split_aux(aux)
        weighted = jax.tree.map(lambda x: x * tokens, (loss, means, grads))
        return jax.tree.map(jnp.add, carry, (*weighted, tokens)), None

    (loss0, aux0), g0 = jax.eval_shape(vg, params, jax.tree.map(lambda x: x[0], micro), n, poison)
    means0 = {k: v for k, v in aux0.items() if k != "tokens"}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss0, means0, g0))
    init = (*zeros, jnp.zeros((), jnp.float32))
    (loss, means, grads, tokens), _ = jax.lax.scan(body, init, micro)
    inv = 1.0 / jnp.maximum(tokens, 1.0)
    loss, means, grads = jax.tree.map(lambda x: x * inv, (loss, means, grads))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, {**means, "tokens": tokens}, grads


def _global_norm(tree) -> jax.Array:
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5; global_norm is deprecated
    return norm(tree) if norm is not None else optax.global_norm(tree)


def make_train_step(cfg: Config, graphdef, rest):
    """step(state, batch, n, poison) -> (state, metrics). Pure; jit it via Placement."""
    tx = make_optimizer(cfg.train)
    schedule = lr_schedule(cfg.train)

    def step(state, batch, n, poison):
        params, opt_state = state["params"], state["opt_state"]
        loss, aux, grads = accumulated_grads(cfg, graphdef, rest, params, batch, n, poison)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # skip the update: state unchanged
        streak = jnp.where(finite, 0, state["nan_streak"] + 1)
        new_state = {
            "params": jax.tree.map(keep, new_params, params),
            "opt_state": jax.tree.map(keep, new_opt, opt_state),
            "step": state["step"] + 1,
            "opt_step": state["opt_step"] + finite.astype(jnp.int32),
            "rng": state["rng"],
            "nan_streak": streak.astype(jnp.int32),
            "nan_total": (state["nan_total"] + (~finite)).astype(jnp.int32),
        }
        metrics = {
            "loss": loss,
            **{k: v for k, v in aux.items()},
            "grad_norm": grad_norm,
            "lr": schedule(state["opt_step"]),
            "depth": n,
            "finite": finite,
            "nan_streak": new_state["nan_streak"],
            "nan_total": new_state["nan_total"],
        }
        return new_state, metrics

    return step


def make_eval_step(cfg: Config, graphdef, rest):
    """eval(params, batch, n) -> (metrics, pred_BT): loss/aux at depth n and greedy predictions."""

    cap = scan_cap(cfg.model, eval_depths(cfg))  # eval depths may run past max_iterations

    def evaluate(params, batch, n):
        model = merge_model(graphdef, params, rest)
        loss, aux = model.loss(batch, n=n, bptt_k=0, depth_cap=cap, with_pred=True)
        pred_BT = aux.pop("pred")
        return {"loss": loss, **aux}, pred_BT

    return evaluate
