"""Looped-depth transformer: model, loss pieces, depth schedules."""

from asura.model.depth import depth_distribution, sample_depth
from asura.model.looped import LoopedLM

__all__ = ["LoopedLM", "depth_distribution", "sample_depth"]
