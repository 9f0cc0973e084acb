"""Use a trained model: KV-cached generation, sampling and log-likelihood scoring (issue #17).

    asura.infer.policies   POLICIES: KV cache policies by name (per_iteration, shared_last, recompute) and
                           generation_memory(), the estimate generate's CLI checks; pure python
    asura.infer.cache      KVCache, init_cache, prefill, extend, CachedModel (jitted): the loop with a cache
    asura.infer.sample     Sampling (greedy, temperature, top-k, top-p) and sample()
    asura.infer.generate   generate(): batched generation from ragged prompts, stop tokens, a seed
    asura.infer.score      loglikelihoods(), rolling_loglikelihoods() (lm-eval's windows): teacher-forced scoring
    asura.infer.harness    AsuraLM: an lm-evaluation-harness model (needs the `eval` extra)
    asura.infer.cli        what the two commands share: --workdir/--step/--extrapolation, one-line refusals

Everything reuses the model's own blocks (LoopedLM.iteration_cached runs the same per-iteration
ops as training's LoopedLM.iteration); there is no second model. Depth n is traced everywhere: one
compiled program per shape serves every depth, as in training.
Commands: `python -m asura.generate`, `python -m asura.evaluate`; benchmark: bench/generate.py.
Nothing here is imported by training, and importing this package imports nothing.
"""
