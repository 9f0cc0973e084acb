"""Optuna sweeps of asura training runs, with honest (labelled) comparisons.

    python -m asura.sweep SPEC.yaml [--workdir DIR] [--workers N] [--baselines] [--max-trials K]
                                    [--fail-running] [--dry-run]
    python -m asura.sweep report DIR

Modules: ``spec`` (YAML schema, validation, grid cells and derived baselines), ``runner``
(study, workers, trial execution, pruning), ``trainer`` (one trial = ``train.py`` in a child
process, eval events read from its metrics.jsonl), ``manifest`` (per-trial accounting),
``compare`` (iso-param / iso-FLOP / neither, refusal), ``report`` (CSV, Markdown, PNG).
Presets live in ``configs/sweeps/``.
"""
