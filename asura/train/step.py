"""Jitted train and eval steps (pure functions of the state pytree).

* depth `n` is a traced int32 and the loop length is asura.depth.scan_length of the
  schedule's largest depth, so every depth shares one compiled program;
* gradient accumulation scans over `grad_accum` microbatches and weights each by its
  scored-token count, so the result equals the full-batch gradient of a token-mean loss
  (up to float summation order);
* a non-finite loss or gradient norm keeps params and optimiser state unchanged (selected
  with jnp.where inside the step) and bumps the NaN counters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from asura.compat import tree_norm
from asura.config import Config
from asura.depth import eval_depths, max_train_depth
from asura.model.halting import train_spec
from asura.model.loss import masked_mean
from asura.train.evaluate import eval_step
from asura.train.optim import freezes, lr_schedule, make_optimizer, trained_mask
from asura.train.state import merge_model


def _loss_and_grads(cfg: Config, graphdef, rest, halting: bool):
    bptt_k, max_depth = cfg.depth.bptt_k, max_train_depth(cfg)
    halt = train_spec(cfg.depth) if halting else None  # None unless this step trains under per-token halting
    gate_loss = halt is not None and cfg.depth.halt_gate_loss

    def loss_fn(params, batch, n):
        if freezes(cfg.train):  # frozen parameters: no gradient, none in grad_norm
            on = trained_mask(cfg.train, params)
            params = jax.tree.map(lambda p, o: p if o else jax.lax.stop_gradient(p), params, on)
        model = merge_model(graphdef, params, rest)
        objective, aux = model.loss(batch, n=n, bptt_k=bptt_k, max_depth=max_depth, halt=halt, gate_loss=gate_loss)
        if halt is not None:  # a token mean like every train metric: the iterations each scored token ran
            depth_BT = aux.pop("depth_BT").astype(jnp.float32)
            aux["halt_depth"] = masked_mean(depth_BT, batch["loss_mask"].astype(jnp.float32))
        return objective, aux

    return jax.value_and_grad(loss_fn, has_aux=True)


def _split_aux(aux: dict) -> tuple[dict, jax.Array]:
    """(token-mean metrics, scored-token count) from the model's aux dict."""
    tokens = jnp.asarray(aux["tokens"], jnp.float32)
    means = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if k != "tokens"}
    return means, tokens


def accumulated_grads(cfg: Config, graphdef, rest, params, batch, n, halting: bool = False):
    """(objective, aux, grads) over the global batch, scanning grad_accum microbatches; halting: under
    the run's depth.halt_rule."""
    vg = _loss_and_grads(cfg, graphdef, rest, halting)
    accum = cfg.train.grad_accum
    if accum == 1:
        (loss, aux), grads = vg(params, batch, n)
        return loss, aux, grads

    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
        (loss, aux), grads = vg(params, mb, n)
        means, tokens = _split_aux(aux)
        weighted = jax.tree.map(lambda x: x * tokens, (loss, means, grads))
        return jax.tree.map(jnp.add, carry, (*weighted, tokens)), None

    (loss0, aux0), g0 = jax.eval_shape(vg, params, jax.tree.map(lambda x: x[0], micro), n)
    means0 = {k: v for k, v in aux0.items() if k != "tokens"}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss0, means0, g0))
    init = (*zeros, jnp.zeros((), jnp.float32))
    (loss, means, grads, tokens), _ = jax.lax.scan(body, init, micro)
    inv = 1.0 / jnp.maximum(tokens, 1.0)
    loss, means, grads = jax.tree.map(lambda x: x * inv, (loss, means, grads))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, {**means, "tokens": tokens}, grads


def halting_at(cfg: Config, step: int) -> bool:
    """Whether optimiser step `step` (0-based) trains under halting (depth.halt_rule from depth.halt_from)."""
    return bool(cfg.depth.halt_rule) and step >= cfg.depth.halt_from


def make_train_step(cfg: Config, graphdef, rest, axes, halting: bool | None = None):
    """step(state, batch, n) -> (state, metrics). Pure; jit it through a Placement. halting: train under
    depth.halt_rule (default: as at step 0, halting_at); a run with depth.halt_from > 0 has both steps."""
    halting = halting_at(cfg, 0) if halting is None else halting
    tx = make_optimizer(cfg.train, axes)
    schedule = lr_schedule(cfg.train)

    def step(state, batch, n):
        params, opt_state = state["params"], state["opt_state"]
        objective, aux, grads = accumulated_grads(cfg, graphdef, rest, params, batch, n, halting)
        grad_norm = tree_norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # skip the update: state unchanged
        streak = jnp.where(finite, 0, state["nan_streak"] + 1)
        new_state = {
            "params": jax.tree.map(keep, new_params, params),
            "opt_state": jax.tree.map(keep, new_opt, opt_state),
            "step": state["step"] + 1,
            "opt_step": state["opt_step"] + finite.astype(jnp.int32),
            "nan_streak": streak.astype(jnp.int32),
            "nan_total": (state["nan_total"] + (~finite)).astype(jnp.int32),
        }
        metrics = {
            "objective": objective,
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
    """eval(params, batch, n) -> (metrics, pred_BT) through the shared `evaluate.eval_step`."""
    max_depth = max(eval_depths(cfg))  # eval depths may run past max_iterations (extrapolation)

    def evaluate(params, batch, n):
        return eval_step(merge_model(graphdef, params, rest), batch, n, max_depth)

    return evaluate
