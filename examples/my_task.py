"""A task of your own, without editing asura: train with

    PYTHONPATH=examples .venv/bin/python train.py --workdir runs/sort data.task=my_task:SortDigits

A task is a `Task` subclass with `generate` (an Example from a numpy Generator; the prompt must
fix the answer, because the held-out split hashes the prompt) and `max_len` (tokens per example,
answer and newline included). `n_problems` (optional) lets the config check refuse a split too
small to measure; `_parse` and `question_form` (optional) let `generate --question` format a
question.
"""

import re

import numpy as np

from asura.data.tasks import Example, Task


class SortDigits(Task):
    """``3817=`` -> ``1378``: sort the digits, ascending."""

    name = "sort_digits"  # part of each problem's hash: renaming a task changes its split
    question_form = "digits, e.g. 3817"

    def generate(self, rng: np.random.Generator, difficulty: int) -> Example:
        digits = "".join(map(str, rng.integers(0, 10, size=difficulty)))
        return Example(digits + self.marker, "".join(sorted(digits)))

    def max_len(self, difficulty: int) -> int:
        return 2 * difficulty + 2  # digits, "=", sorted digits, "\n"

    def n_problems(self, difficulty: int) -> int:
        return 10**difficulty

    def _parse(self, body: str, difficulty: int) -> str | None:
        return body + self.marker if re.fullmatch("[0-9]+", body) else None
