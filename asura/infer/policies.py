"""KV cache policies for the depth loop, chosen by name (``--cache``); pure python.

A looped model applies each of its L shared blocks n times, so one token has one key/value
pair per (iteration t, layer l). A policy says which of them generation keeps and which
earlier-token keys/values iteration t of a new token attends to.

    name           slots R   iteration t of a new token attends to              exact?
    per_iteration  S         earlier tokens' k/v from the same iteration t       yes
    shared_last    1         earlier tokens' k/v from their LAST iteration       no (Ouro-style)
                             (n-1), and its own iteration-t k/v for itself
    recompute      0         nothing cached: every new token reruns the full     yes
                             forward over the whole buffer (the uncached baseline)

Cache memory (keys + values): R · L · B · T · K · H · 2 · bytes(dtype), with S the loop length
(asura.depth.scan_length: >= n), L layers, B rows, T cache positions, K kv heads (GQA), H the
head size. shared_last is S× smaller than per_iteration; recompute keeps only the token buffer
(B · T int32) but costs a full T-token forward per new token.

What shared_last approximates: in the trained forward pass iteration t's query sees iteration
t's keys of the earlier tokens; shared_last substitutes their final-iteration keys/values
(which is what a depth-n model "means" by those tokens). It is exact at depth 1 and, for the
prompt, inside the prefill (the prompt runs as one chunk, each iteration over its own k/v);
the gap grows with depth. bench/generate.py --workdir measures it on a trained checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from asura.registry import Registry


@dataclass(frozen=True)
class CachePolicy:
    doc: str  # one line for --help and docs
    exact: bool  # generation equals the full forward's (up to fp32 rounding)
    per_iteration: bool  # True: one slot per loop step, iteration t reads/writes slot t;
    #                      False: one shared slot, read by every iteration, written by the last
    cached: bool = True  # False: no KV cache at all (recompute)

    def slots(self, S: int) -> int:
        """Cache slots R for a loop of length S."""
        if not self.cached:
            return 0
        return S if self.per_iteration else 1

    def cache_bytes(self, *, S: int, layers: int, batch: int, length: int, kv_heads: int, head_dim: int, itemsize: int):
        """Bytes of cached keys + values: R · L · B · T · K · H · 2 · itemsize."""
        return self.slots(S) * layers * batch * length * kv_heads * head_dim * 2 * itemsize


POLICIES: Registry[CachePolicy] = Registry("cache", "which keys/values generation keeps across the depth loop")
POLICIES.add(
    "per_iteration",
    CachePolicy("exact: one k/v slot per (iteration, layer); memory S·L·B·T·K·H·2", exact=True, per_iteration=True),
)
POLICIES.add(
    "shared_last",
    CachePolicy(
        "approximate (Ouro-style): every iteration reads the earlier tokens' last-iteration k/v; memory L·B·T·K·H·2",
        exact=False,
        per_iteration=False,
    ),
)
POLICIES.add(
    "recompute",
    CachePolicy(
        "exact, no cache: rerun the full forward over the token buffer for every new token",
        exact=True,
        per_iteration=False,
        cached=False,
    ),
)
