"""A trained model outside training: reading any checkpoint read-only, below both the analysis
tools (asura.analysis) and inference (asura.infer), which import it and never each other.

    load    load(path, step=None) -> Loaded(model, cfg, step, workdir); resolve, checkpoint_steps,
            model_from_params, with_extrapolation

Submodules are imported explicitly (they pull in JAX).
"""
