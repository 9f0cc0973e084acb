"""Optimiser: AdamW with warmup + cosine, global-norm clipping and a weight-decay mask.

The schedule counts *optimiser* steps (skipped non-finite steps do not advance
it, because the whole optimiser state is kept unchanged on a skip).
"""

from __future__ import annotations

import re

import jax
import optax

from asura.config import TrainConfig

# A parameter is exempt from weight decay when its path names a norm, bias, scale or
# input embedding. Path-based because per-iteration norms carry an iteration axis
# ([I, D]), so "ndim < 2" alone would wrongly decay them. An untied output head
# ("unembed", "lm_head") is a projection and is decayed.
_NO_DECAY_NAMES = frozenset({"bias", "scale", "embedding", "embed", "embedder", "tok_embed", "wte", "wpe", "pos_embed"})


_LN_RE = re.compile(r"ln(\d*|_\w+)")  # ln, ln1, ln_f


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


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "name", None)
        if name is None:
            name = getattr(k, "idx", "")
        out.append(str(name))
    return out


def decays(path_names: list[str], ndim: int) -> bool:
    """True when a parameter at this path should get weight decay."""
    if ndim < 2:
        return False
    for name in (n.lower() for n in path_names):
        if "norm" in name or name in _NO_DECAY_NAMES or name.endswith(("_bias", "_scale")) or _LN_RE.fullmatch(name):
            return False
    return True


def decay_mask(params):
    """Pytree of bools matching `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, x: decays(_path_names(p), x.ndim), params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
