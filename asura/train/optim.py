"""Optimiser: AdamW with warmup + cosine, global-norm clipping and a weight-decay mask.

The schedule counts *optimiser* steps (skipped non-finite steps do not advance
it, because the whole optimiser state is kept unchanged on a skip).
"""

from __future__ import annotations

import jax
import optax

from asura.config import TrainConfig

# Weight decay is a rule on logical axes (nanoGPT's "matrices decay" rule, made
# iteration-aware): a parameter decays when it has >= 2 feature axes once the
# per-iteration "iteration" axis is dropped, so norms' scales/biases ([D] or [M, D])
# never decay, and projections, adapters and an untied head do. The token embedding
# [vocab, embed] is a lookup table, not a map: its rows get gradient only when their
# token appears, so decay would shrink rare tokens (GPT-2 / nanoGPT leave it undecayed).


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine to lr*min_lr_ratio at train.steps."""
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.lr,
        warmup_steps=warmup,
        decay_steps=max(t.steps, warmup + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def decays(names: tuple[str | None, ...] | None) -> bool:
    """True when a parameter with these logical axis names gets weight decay."""
    feature = [n for n in (names or ()) if n != "iteration"]
    return len(feature) >= 2 and feature[0] != "vocab"


def decay_mask(axes):
    """Pytree of bools shaped like the params: True where weight decay applies (`axes` from train.state)."""
    return jax.tree.map(lambda a: decays(a.names), axes)


def make_optimizer(t: TrainConfig, axes) -> optax.GradientTransformation:
    """AdamW (+ clipping); `axes` is the params-shaped pytree of Axes that sets the decay mask."""
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(
        optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask(axes))
    )
    return optax.chain(*parts)
