"""Which tokens of a prepared corpus are held out for eval: whole documents where they fit.

Documents arrive one at a time (a Hugging Face stream has no known length), so the rule is
online. After ``seen`` tokens the eval split should hold ``max(fraction * seen, min_tokens)``;
``deficit`` is that target minus what eval holds. For each document of ``n`` tokens:

  deficit <= 0                          it trains
  n <= 2 * deficit                      it goes to eval whole (eval lands nearer the target with it)
  deficit >= PIECE_TOKENS or eval is    its last max(deficit, PIECE_TOKENS) tokens go to eval and the
    still below min_tokens              head trains: a long document may not swallow or escape the split
  otherwise                             it trains, and the deficit carries over

Invariants (tested): every token lands in exactly one split, in order; eval holds at least
min_tokens (so at least one document) once the corpus has that many; eval stays within about
PIECE_TOKENS, or one document, of fraction * seen.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# The shortest piece cut from a document for eval. Larger keeps more documents whole: pydoc at 5%
# holds out 13 whole documents and 4 tails with 2048, but 1 whole and 26 tails with 256.
PIECE_TOKENS = 2048


class Part(NamedTuple):
    train: np.ndarray | None  # the head (or all) of the document, or None
    eval: np.ndarray | None  # the tail (or all) of the document, or None


class EvalSplit:
    def __init__(self, fraction: float, min_tokens: int):
        if not 0 < fraction <= 0.5:
            raise ValueError(f"--eval-fraction must be in (0, 0.5] (training evaluates on the split), got {fraction}")
        if min_tokens < 1:
            raise ValueError(f"--eval-min-tokens must be >= 1 (training evaluates on the split), got {min_tokens}")
        self.fraction, self.min_tokens = fraction, min_tokens
        self.seen = self.eval_tokens = self.cut_documents = 0

    def __call__(self, ids_L: np.ndarray) -> Part:
        n = len(ids_L)
        self.seen += n
        deficit = max(self.fraction * self.seen, self.min_tokens) - self.eval_tokens
        take = 0
        if deficit <= 0:
            take = 0
        elif n <= 2 * deficit:
            take = n
        elif deficit >= PIECE_TOKENS or self.eval_tokens < self.min_tokens:
            take = min(n, max(math.ceil(deficit), PIECE_TOKENS))
        self.eval_tokens += take
        if take == 0:
            return Part(train=ids_L, eval=None)
        if take == n:
            return Part(train=None, eval=ids_L)
        self.cut_documents += 1
        return Part(train=ids_L[: n - take], eval=ids_L[n - take :])
