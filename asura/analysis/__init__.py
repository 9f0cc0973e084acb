"""Analysis of looped models: depth sweeps, per-iteration telemetry, early exit, plots. Models
are loaded by asura.io.load (below this package and asura.infer).

    depth          evaluate_depths, logits_at, model_telemetry, batches_telemetry
    telemetry      pure telemetry over latents [S, B, T, D] + a head fn -> {key: [B, T, n]}
    exits          Huginn-style exit criteria and accuracy-vs-mean-depth curves
    plots          matplotlib helpers returning Figures (every axis labelled with its unit)
    units          axis labels: each plotted quantity's name and unit
    sweep_results  read a `python -m asura.sweep` directory

Submodules are imported explicitly (they pull in JAX / matplotlib).
"""
