"""One stdout line per trial event, so a running sweep says what it is doing (optuna's own INFO log is off).

    sweep tiny_cpu: 10 trials, 4 done, 6 to run -> runs/sweep
    trial 5/10 started: no_injection|seed=0 (model.injection=none)
    trial 5/10 finished: no_injection|seed=0 exact_match=0.5312 in 41.2 s
    trial 6/10 pruned: all_off|seed=0 at eval 0 (step 125): exact_match=0.03125 after 20.3 s
    trial 7/10 failed: iso_param(full)|seed=0 after 3.1 s: RuntimeError: train.py exited 1: ...

``k/N`` is the cell's place in the grid (stable across resumes and workers), or for a search the
optuna trial number + 1 over ``n_trials``. Workers print their own lines; each line is written whole
and flushed, so lines of parallel workers interleave but never mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from asura.sweep.keys import format_overrides

Say = Callable[[str], None]


def say_flushed(line: str) -> None:
    print(line, flush=True)  # workers write to the parent's stdout; unflushed lines would arrive late


def one_line(text: str, limit: int = 300) -> str:
    first = (str(text).strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


@dataclass(frozen=True)
class TrialLine:
    """What every line about one trial starts with: ``trial k/N <event>: <key>``."""

    index: int  # 1-based
    total: int
    key: str

    def _head(self, event: str) -> str:
        return f"trial {self.index}/{self.total} {event}: {self.key}"

    def started(self, role: str, overrides: dict, parent: str | None) -> str:
        what = f"{role} of {parent}" if role != "trial" else format_overrides(overrides) if overrides else ""
        return self._head("started") + (f" ({what})" if what else "")

    def finished(self, metric: str, value: float, wall_s: float) -> str:
        return f"{self._head('finished')} {metric}={value:.4g} in {wall_s:.1f} s"

    def pruned(self, reason: str, wall_s: float) -> str:
        return f"{self._head('pruned')} at {one_line(reason)} after {wall_s:.1f} s"

    def failed(self, reason: str, wall_s: float) -> str:
        return f"{self._head('failed')} after {wall_s:.1f} s: {one_line(reason)}"
