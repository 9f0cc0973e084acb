"""Optuna sweeps of asura training runs, with honest (labelled) comparisons.

    python -m asura.sweep SPEC.yaml [key=value ...] [--workdir DIR] [--workers N] [--baselines] [--max-trials K]
                                    [--fail-running] [--dry-run]
    python -m asura.sweep report DIR [--metric NAME[@DEPTH]]
    python -m asura.sweep extrapolate DIR [--factor K] [--modes M,..]
    python -m asura.sweep study PLAN.yaml [--only NAMES] [--workers N] [--dry-run]

Modules: ``spec`` (YAML schema and load-time validation) with its parts ``keys`` (SpecError,
dotted config keys), ``grid`` (cells and derived baselines, built once per load), ``search``
(typed search/pruner sections) and ``metrics`` (the metric registry and the depth it is read
at); ``runner`` (study, workers, trial execution, pruning, resume checks), ``progress`` (one stdout
line per trial event), ``trainer`` (one trial =
``train.py`` in a child process, eval events read from its metrics.jsonl), ``manifest``
(per-trial accounting, git commit), ``compare`` (iso-param / iso-FLOP / neither, refusal),
``stats`` (mean and 95% CI over seeds, paired or Welch t-test, the verdict in words), ``report``
(CSV, Markdown, PNG, REPORT.md), ``study`` (plans of several sweeps), ``extrapolation`` (a sweep's
checkpoints past their trained depth). Presets live in ``configs/sweeps/``, plans in ``configs/studies/``.
"""
