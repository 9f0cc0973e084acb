"""lm-evaluation-harness model "asura": score and generate with any checkpoint at any depth.

Needs the `eval` extra (``pip install -e '.[eval]'``: lm-eval's core, no torch/transformers).
Importing this module registers the model; the Python API is the way in::

    import lm_eval
    from asura.infer.harness import AsuraLM
    lm = AsuraLM(workdir="runs/demo", depth=6, extrapolation="last")
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

or ``lm_eval.simple_evaluate(model="asura", model_args="workdir=runs/demo,depth=6", ...)`` after
the import. Requests go to asura.infer: loglikelihood and loglikelihood_rolling to
score.loglikelihoods (the training forward, teacher-forced), generate_until to
generate.generate (KV cache policy `cache`, greedy unless the task asks to sample).

The model has no BOS/EOT token, which lm-eval's HF model puts where there is nothing to condition
on. What is scored instead:
* loglikelihood with an empty context (lm-eval's HF model: log p(continuation | EOT)):
  log p(continuation[1:] | continuation[0]), its first token given and never scored; a one-token
  continuation scores 0.0 and counts as greedy (nothing is predicted).
* loglikelihood_rolling: every token of the document but the first (lm-eval's HF model scores it
  given EOT), in lm-eval's own windows otherwise (asura.infer.score, module docstring).
"""

from __future__ import annotations

import numbers

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from asura.depth import DEPTH_LIMIT
from asura.infer.generate import generate
from asura.infer.sample import Sampling
from asura.infer.score import LogLik, loglikelihoods, rolling_loglikelihoods


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split where the whole string's tokens split:
    trailing spaces move from the context to the continuation (as lm-eval's HF model)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole, ctx = tok.encode_batch([context + continuation, context])
    return whole[: len(ctx)], whole[len(ctx) :]


def check_depth(depth) -> None:
    """None (the trained depth) or an integer in 1..DEPTH_LIMIT; lm-eval's model_args give ints as ints."""
    if depth is None:
        return
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= DEPTH_LIMIT:
        raise ValueError(
            f"depth must be an integer >= 1 and <= asura.depth.DEPTH_LIMIT={DEPTH_LIMIT}, or None for the "
            f"trained depth; got {depth!r}"
        )


@register_model("asura")
class AsuraLM(LM):
    def __init__(
        self,
        workdir: str,
        depth: int | None = None,
        step: str | int = "latest",
        extrapolation: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        cache: str = "per_iteration",
        max_gen_toks: int = 256,
        seed: int = 0,
        device: str | None = None,  # lm-eval passes these two to every model; JAX places arrays itself
        max_batch_size: int | None = None,
    ):
        super().__init__()
        check_depth(depth)  # before loading: a bad argument costs nothing
        from asura.data.tokenizer import load_tokenizer
        from asura.io.load import load

        step = int(step) if isinstance(step, str) and step.isdigit() else step
        loaded = load(workdir, step, extrapolation=extrapolation or None)
        self.model, self.cfg, self.step = loaded.model, loaded.cfg, loaded.step
        self.depth = self.cfg.model.iterations if depth is None else int(depth)
        self.max_depth = max(self.depth, self.cfg.model.max_iterations)
        self.model.scan_len(self.depth, self.max_depth)  # DepthError past max_iterations without extrapolation
        self.tok = load_tokenizer(self.cfg.data.tokenizer)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.cfg.data.seq_len)
        self.cache, self.max_gen_toks, self.seed = cache, int(max_gen_toks), int(seed)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.spec

    def _score_kw(self) -> dict:
        return dict(max_len=self.max_length, batch_size=self.batch_size, max_depth=self.max_depth)

    def _score(self, pairs):
        return loglikelihoods(self.model, pairs, self.depth, **self._score_kw())

    def _pair(self, context: str, continuation: str):
        """(context ids, continuation ids), or None when nothing is to be scored (module docstring)."""
        if context:
            return encode_pair(self.tok, context, continuation)
        ids = self.tok.encode_batch([continuation])[0]
        return (ids[:1], ids[1:]) if len(ids) > 1 else None

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        scored = iter(self._score([p for p in pairs if p is not None]))
        out = [tuple(LogLik(0.0, True) if p is None else next(scored)) for p in pairs]
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        docs = self.tok.encode_batch([r.args[0] for r in requests])
        out = rolling_loglikelihoods(self.model, docs, self.depth, **self._score_kw())
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
        return out

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one generate() call per distinct gen_kwargs
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = Sampling(
                float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0,
                int(kw.get("top_k") or 0),
                float(kw.get("top_p") or 1.0),
            )
            stops = [ids[0] for ids in self.tok.encode_batch(until) if len(ids) == 1] if until else []
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                prompts = [
                    ids[-self.max_length :] for ids in self.tok.encode_batch([requests[i].args[0] for i in chunk])
                ]
                gen = generate(
                    self.model, prompts, self.depth, max_new_tokens=max_new, sampling=sampling, stop_tokens=stops,
                    seed=self.seed, cache=self.cache, max_depth=self.max_depth,
                )  # fmt: skip
                for i, ids in zip(chunk, gen.tokens, strict=True):
                    text = self.tok.decode(ids)
                    for u in until:  # cut at the first stop string (multi-token ones included)
                        text = text.split(u, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
