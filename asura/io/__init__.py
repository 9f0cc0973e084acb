"""A trained model outside training: reading any checkpoint read-only, below both the analysis
tools (asura.analysis) and inference (asura.infer), which import it and never each other.

    load    load(path, step=None) -> Loaded(model, cfg, step, workdir); resolve, checkpoint_steps,
            model_from_params, with_extrapolation
    names   the parameter-name table: NNX paths <-> stable (Llama-style) tensor names, torch layout
    export  export / export_model -> safetensors + config.json + tokenizer (+ hf/ modeling files);
            load_export (back into asura, bit-exact); stock_architecture (Llama/Qwen3 or refused)
    hf/     configuration_asura.py, modeling_asura.py: copied into an export, never imported here

Submodules are imported explicitly (they pull in JAX).
"""
