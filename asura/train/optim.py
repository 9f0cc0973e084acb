"""Optimiser: AdamW with warmup + cosine, global-norm clipping and a weight-decay mask.

The schedule counts *optimiser* steps (skipped non-finite steps do not advance
it, because the whole optimiser state is kept unchanged on a skip).

Extending a run. The cosine's length is train.steps, so raising train.steps on a finished run
would recompute the whole curve (lr jumps from the floor back up mid-decay). Instead a run is
extended by an event at the old train.steps (`train.hold_at` or `train.rewarm_at`): the schedule
is a sequence of segments, each starting at an event and ending at the next event (or
train.steps), so appending an event never changes the lr of a step already trained:

    segment 0        [0, e1)      warmup from 0 to lr, cosine to lr*min_lr_ratio at e1
    hold at e        [e, next)    constant: the value the previous segment reached at e
    rewarm at e      [e, next)    warmup from that value to lr, cosine to the floor at next

`schedule_change` says whether two configs give any already-trained step another lr (the resume check).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from asura.config import TrainConfig
from asura.config.schema import TRAINABLE

# Weight decay is a rule on logical axes (nanoGPT's "matrices decay" rule, made
# iteration-aware): a parameter decays when it has >= 2 feature axes once the
# per-iteration "iteration" axis is dropped, so norms' scales/biases ([D] or [M, D])
# never decay, and projections, adapters and an untied head do. The token embedding
# [vocab, embed] is a lookup table, not a map: its rows get gradient only when their
# token appears, so decay would shrink rare tokens (GPT-2 / nanoGPT leave it undecayed).


def _warmup_cosine(t: TrainConfig, start_value: float, length: int) -> optax.Schedule:
    warmup = min(t.warmup_steps, max(length - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=start_value,
        peak_value=t.lr,
        warmup_steps=warmup,
        decay_steps=max(length, warmup + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


class Segment(NamedTuple):
    start: int  # first optimiser step of the segment
    kind: str  # "cosine" (the first) | "hold" | "rewarm"
    end: int  # the step where the next segment (or train.steps) begins


def segments(t: TrainConfig) -> list[Segment]:
    """The schedule's segments in order (one when the run was never extended)."""
    events = sorted([(s, "hold") for s in t.hold_at] + [(s, "rewarm") for s in t.rewarm_at])
    starts = [(0, "cosine"), *events]
    out = []
    for i, (start, kind) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else max(t.steps, start + 1)
        out.append(Segment(start, kind, end))
    return out


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """Warmup from 0 to lr over warmup_steps, then cosine to lr*min_lr_ratio at train.steps; extended
    runs join one schedule per segment (module docstring). Unextended: exactly optax's warmup-cosine."""
    parts: list[optax.Schedule] = []
    value = 0.0
    for seg in segments(t):
        if seg.kind == "hold":
            fn = optax.constant_schedule(value)
        else:
            fn = _warmup_cosine(t, value, seg.end - seg.start)
        parts.append(fn)
        with jax.ensure_compile_time_eval():  # a constant even when the optimiser is built under a trace
            value = float(fn(seg.end - seg.start))  # what the next segment starts from
    if len(parts) == 1:
        return parts[0]
    return optax.join_schedules(parts, [seg.start for seg in segments(t)[1:]])


def _seen(t: TrainConfig, trained: int) -> list[tuple]:
    """What determines the lr of optimiser steps 0..trained-1, segment by segment.

    A warmup-cosine segment with effective warmup w and length L, seen at offsets r = 0..R: its
    value at r = 0 is the start value when w > 0 and the peak when w = 0; r >= 1 depends on w;
    and only r > w (past the peak) depends on L. A hold depends only on where it starts (its value
    is where the previous segment ended)."""
    out = []
    segs = segments(t)
    last = segs[-1]
    if trained > last.end:  # past its end the last segment's lr stays where it ended: an implicit hold
        segs = [*segs, Segment(last.end, "hold", trained)]
    for seg in segs:
        if seg.start >= trained:
            break
        if seg.kind == "hold":
            if not (out and out[-1][1] == "hold"):  # a hold after a hold changes nothing
                out.append((seg.start, "hold"))
            continue
        length = seg.end - seg.start
        w = min(t.warmup_steps, max(length - 1, 0))
        r_max = min(trained, seg.end) - 1 - seg.start
        out.append((seg.start, seg.kind, w == 0, w if r_max >= 1 else None, length if r_max > w else None))
    return out


def schedule_change(old: TrainConfig, new: TrainConfig, trained: int) -> str | None:
    """How `new`'s schedule differs from `old`'s on the steps already trained (0..trained-1), or None.

    Structural, not numeric (no JAX: the resume check runs before anything compiles): two schedules
    with the same lr, warmup_steps and min_lr_ratio give the same lr at a step when the segments up
    to it agree in start, kind, effective warmup and, past the warmup, end."""
    a, b = _seen(old, trained), _seen(new, trained)
    if a == b:
        return None
    differ = [x[0] for x, y in zip(a, b, strict=False) if x != y]
    where = differ[0] if differ else max(a, b, key=len)[min(len(a), len(b))][0]
    old_end = next((seg.end for seg in segments(old) if seg.start == where), old.steps)
    new_end = next((seg.end for seg in segments(new) if seg.start == where), new.steps)
    return f"the schedule segment from step {where} would end at step {new_end} instead of {old_end}"


def decays(names: tuple[str | None, ...] | None) -> bool:
    """True when a parameter with these logical axis names gets weight decay."""
    feature = [n for n in (names or ()) if n != "iteration"]
    return len(feature) >= 2 and feature[0] != "vocab"


def decay_mask(axes):
    """Pytree of bools shaped like the params: True where weight decay applies (`axes` from train.state)."""
    return jax.tree.map(lambda a: decays(a.names), axes)


def freezes(t: TrainConfig) -> bool:
    """Whether train.trainable leaves some parameters out of the optimiser's updates."""
    return TRAINABLE[t.trainable] is not None


def trained_mask(t: TrainConfig, tree):
    """Pytree of bools shaped like `tree` (params, grads or axes): True where train.trainable updates."""
    names = TRAINABLE[t.trainable]
    return jax.tree_util.tree_map_with_path(lambda path, _: names is None or path[0].key in names, tree)


def make_optimizer(t: TrainConfig, axes) -> optax.GradientTransformation:
    """AdamW (+ clipping); `axes` is the params-shaped pytree of Axes that sets the decay mask. With
    train.trainable other than all, the rest gets zero updates (no decay) and no optimiser state."""
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(
        optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask(axes))
    )
    tx = optax.chain(*parts)
    if not freezes(t):
        return tx
    labels = jax.tree.map(lambda on: "trained" if on else "frozen", trained_mask(t, axes))
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
