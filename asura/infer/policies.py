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
from typing import NamedTuple

from asura.registry import Registry

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of model.dtype (the cache's dtype)


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


class GenerationMemory(NamedTuple):
    """Bytes one generate() call holds at its peak (an estimate: XLA may fuse some away or add buffers)."""

    params: int
    cache: int  # the KV cache of every row over prompt + new tokens (recompute: the token buffer)
    activations: int  # the largest forward: the prompt's prefill (cached) or the whole buffer (recompute)

    @property
    def total(self) -> int:
        return self.params + self.cache + self.activations


def generation_memory(model_cfg, policy: str, *, batch: int, prompt_len: int, max_new: int, scan_len: int,
                      param_bytes: int, attention: str) -> GenerationMemory:  # fmt: skip
    """GenerationMemory of generating max_new tokens after prompts of prompt_len tokens under `policy`.

    cache        policy.cache_bytes over T = prompt_len + max_new positions (recompute: 2 int32 per position)
    activations  one forward over C tokens (C = prompt_len for a cached policy's prefill, T for every
                 recompute step): one layer's fp32 attention scores B·N·C² when `attention` (the
                 resolved impl, asura.model.attention.resolve_impl) is xla, which materialises them
                 (the fused kernels do not), three times (the scores,
                 their exponent and the probabilities are live at once: XLA's memory_analysis on CPU
                 shows 3.1-3.2x one copy), fp32 hidden states B·C·(4D + F)
                 (h, e, the injection's concat, one MLP layer), fp32 logits B·C·V (the prefill's head runs
                 on every prompt position; recompute's on one), and for a cached policy the prefill's
                 new keys/values before they are written into the cache (cache_bytes over C positions)
    """
    m, pol = model_cfg, POLICIES[policy]
    T = prompt_len + max_new
    kv = dict(S=scan_len, layers=m.n_layers, batch=batch, kv_heads=m.kv_heads, head_dim=m.d_head,
              itemsize=ITEMSIZE[m.dtype])  # fmt: skip
    C = prompt_len if pol.cached else T
    scores = 3 * 4 * batch * m.n_heads * C * C if attention == "xla" else 0
    hidden = 4 * batch * C * (4 * m.d_model + m.ff_dim)
    logits = 4 * batch * (C if pol.cached else 1) * m.vocab_size
    if pol.cached:
        return GenerationMemory(param_bytes, pol.cache_bytes(length=T, **kv),
                                scores + hidden + logits + pol.cache_bytes(length=C, **kv))  # fmt: skip
    return GenerationMemory(param_bytes, 8 * batch * T, scores + hidden + logits)
