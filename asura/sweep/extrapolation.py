"""Depth extrapolation of a finished sweep: every complete trial's final checkpoint evaluated at
depths 1 .. factor × its trained depth under each extrapolation mode, without retraining.

    python -m asura.sweep extrapolate DIR [--factor 4] [--modes none,last,cycle] [--metric exact_match]

Per cell the results are kept in ``DIR/extrapolation/<cell>.json`` (keyed by mode, depths and
batches; with the record they came from, the checkpoint step and the commit that evaluated them;
a result whose record has been replaced by a retrained one is evaluated again), committed with the study's
records: a rerun only evaluates what is missing, and with every result present it rewrites
EXTRAPOLATION.md from them alone, no checkpoint needed. Only the sweep's own cells are evaluated,
not its lr-tuning trials. ``DIR/EXTRAPOLATION.md`` and ``DIR/plots/extrapolation.png`` then show,
per (group, mode) and depth, the mean over seeds with its 95% CI cut to the metric's range. Mode
``none`` cannot run past ``model.max_iterations``: those cells are "-", never 0.
The numbers are asura.analysis.depth.evaluate_depths' (the training eval: ``ce`` is the final
iteration's cross-entropy, ``exact_match`` the answer exact match), on each trial's own eval set.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from asura.analysis.units import axis_label
from asura.sweep import manifest
from asura.sweep.metrics import METRICS as METRIC_REGISTRY
from asura.sweep.report import EmptySweep, own_complete_cells, read_meta
from asura.sweep.stats import CONFIDENCE, clip_interval, describe

RESULTS = "extrapolation"  # DIR/extrapolation/<cell>.json, committed with the records
MODES = ("none", "last", "cycle")
# What evaluate_depths measures; each metric's direction and range come from the sweep's registry.
METRICS = {name: METRIC_REGISTRY[name].direction for name in ("ce", "accuracy", "exact_match")}


def trial_depths(cfg: dict, factor: int) -> list[int]:
    return list(range(1, factor * int(cfg["model"]["iterations"]) + 1))


def runnable(cfg: dict, mode: str, depth: int) -> bool:
    """Mode `none` runs only the trained slots (depth <= max_iterations); last/cycle run any depth."""
    return mode != "none" or depth <= int(cfg["model"]["max_iterations"])


@dataclass(frozen=True)
class Options:
    """What to evaluate: depths 1 .. factor × trained depth, these modes; the tables' metrics."""

    factor: int = 4
    modes: tuple[str, ...] = MODES
    metrics: tuple[str, ...] = ("exact_match", "ce")
    batches: int | None = None  # eval batches per trial (None: each trial's train.eval_batches)

    def problem(self) -> str | None:
        """The first bad option as 'name: why' ("modes has 'wrap'; valid: ..."), or None."""
        for name, value in (("factor", self.factor), ("batches", self.batches)):
            if value is not None and (not isinstance(value, int) or value < 1):
                return f"{name} must be an integer >= 1, got {value!r}"
        for name, values, valid in (("modes", self.modes, MODES), ("metrics", self.metrics, tuple(METRICS))):
            bad = [v for v in values if v not in valid]
            if bad:
                return f"{name} has {bad[0]!r}; valid: {', '.join(valid)}"
        return None


def _evaluate_trial(trial_dir: Path, depths_by_mode: dict[str, list[int]], batches: int | None) -> dict:
    """{mode: {step, rows}}: the checkpoint is restored and the eval set built once; each mode only
    rebuilds the module around the same parameters (the mode picks slots, it changes no weight)."""
    from flax import nnx

    from asura.analysis.depth import evaluate_depths
    from asura.data import build_eval_batches
    from asura.io.load import load, model_from_params, with_extrapolation

    loaded = load(trial_dir, "latest")
    data = build_eval_batches(loaded.cfg, batches or loaded.cfg.train.eval_batches)
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    out = {}
    for mode, depths in depths_by_mode.items():
        model = model_from_params(with_extrapolation(loaded.cfg, mode), params)
        rows = evaluate_depths(model, data, depths)
        out[mode] = {"step": loaded.step, "rows": {str(r["depth"]): {k: r[k] for k in METRICS} for r in rows}}
    return out


def result_path(sweep_dir: Path, key: str) -> Path:
    """DIR/extrapolation/<cell key as a file name>.json."""
    return manifest.cell_result_path(sweep_dir, RESULTS, key)


def evaluate_sweep(
    sweep_dir: str | Path, factor: int = 4, modes=MODES, batches: int | None = None, say=print
) -> list[dict]:
    """Evaluate (or read from the committed results) every complete cell of the sweep's own; returns
    one record per (cell, mode)."""
    d = Path(sweep_dir)
    cells = own_complete_cells(d)
    if not cells:
        raise EmptySweep(f"sweep dir {d} has no complete trials to extrapolate")
    out = []
    for m in cells:
        cfg = m["config"]
        depths = {mode: [n for n in trial_depths(cfg, factor) if runnable(cfg, mode, n)] for mode in modes}
        keys = {mode: f"{mode}:{','.join(map(str, ds))}:{batches or ''}" for mode, ds in depths.items()}
        mode_of = {k: mode for mode, k in keys.items()}

        def evaluate(tdir, missing, m=m, depths=depths, keys=keys, mode_of=mode_of):
            todo = {mode_of[k]: depths[mode_of[k]] for k in missing}
            for mode, ds in todo.items():
                say(f"extrapolate {m['key']} mode={mode} depths 1..{max(ds)}")
            return {keys[mode]: result for mode, result in _evaluate_trial(tdir, todo, batches).items()}

        results = manifest.cell_results(d, RESULTS, m, [keys[mode] for mode in modes], evaluate)
        out += [{"key": m["key"], "group": m["group"], "seed": m["seed"], "mode": mode, "config": cfg,
                 **results[keys[mode]]} for mode in modes]  # fmt: skip
    return out


def command(sweep_dir: str | Path, opts: Options) -> str:
    """The CLI command that runs (or, with every result committed, only rewrites) this extrapolation."""
    args = [
        "python",
        "-m",
        "asura.sweep",
        "extrapolate",
        str(manifest.shown_path(sweep_dir)),
        "--factor",
        str(opts.factor),
        "--modes",
        ",".join(opts.modes),
        "--metrics",
        ",".join(opts.metrics),
    ]
    return shlex.join(args + (["--batches", str(opts.batches)] if opts.batches else []))


def run(sweep_dir: str | Path, opts: Options, command: str, say=print) -> Path:
    """Evaluate what is missing, then write EXTRAPOLATION.md; returns its path."""
    records = evaluate_sweep(sweep_dir, opts.factor, opts.modes, opts.batches, say=say)
    return write(sweep_dir, records, opts.factor, opts.metrics, command=command)


def summarise(records: list[dict], metric: str, factor: int) -> list[dict]:
    """One row per (group, mode): per depth the seeds' mean, std and 95% CI half-width (None: not runnable)."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        row = rows.setdefault((r["group"], r["mode"]), {
            "group": r["group"], "mode": r["mode"], "trained_depth": int(r["config"]["model"]["iterations"]),
            "max_iterations": int(r["config"]["model"]["max_iterations"]),
            "schedule": r["config"]["depth"]["schedule"], "values": {},
        })  # fmt: skip
        for n, v in r["rows"].items():
            row["values"].setdefault(int(n), []).append(float(v[metric]))
    for row in rows.values():
        top = factor * row["trained_depth"]
        row["depths"] = {n: describe(row["values"].get(n, [])) for n in range(1, top + 1)}
    return list(rows.values())


def _cell(s, metric: str) -> str:
    if s.n == 0:
        return "-"
    if s.half_width is None:
        return f"{s.mean:.3f}"
    low, high = clip_interval(s.mean - s.half_width, s.mean + s.half_width, METRIC_REGISTRY[metric].bounds)
    if (low, high) == (s.mean - s.half_width, s.mean + s.half_width):
        return f"{s.mean:.3f} ± {s.half_width:.3f}"
    return f"{s.mean:.3f} [{low:.3f}, {high:.3f}]"  # cut to the metric's range (exact match stays in [0, 1])


def _table(rows: list[dict], metric: str) -> list[str]:
    top = max(max(r["depths"]) for r in rows)
    head = ["group", "mode", "trained depth", "seeds", *[f"d{n}" for n in range(1, top + 1)]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n_seeds = max((s.n for s in r["depths"].values()), default=0)
        cells = [_cell(r["depths"][n], metric) if n in r["depths"] else "-" for n in range(1, top + 1)]
        out.append(f"| {r['group']} | {r['mode']} | {r['trained_depth']} | {n_seeds} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"last": "-", "cycle": "--", "none": ":"}
    colors: dict[str, str] = {}
    # `none` equals the other modes wherever it runs (depth <= max_iterations): the table has it.
    shown = [r for r in rows if r["mode"] != "none"] or rows
    for r in shown:
        ns = [n for n, s in r["depths"].items() if s.n]
        ys = [r["depths"][n].mean for n in ns]
        err = [r["depths"][n].half_width or 0.0 for n in ns]
        kw = {"color": colors[r["group"]]} if r["group"] in colors else {}
        (line,) = ax.plot(ns, ys, ls=styles.get(r["mode"], "-"), marker="o", ms=3, label=f"{r['group']} ({r['mode']})",
                          **kw)  # fmt: skip
        colors.setdefault(r["group"], line.get_color())
        # the CI band, clipped to the metric's range (a t interval of a fraction can pass 0 or 1)
        band = [clip_interval(y - e, y + e, METRIC_REGISTRY[metric].bounds) for y, e in zip(ys, err)]
        ax.fill_between(ns, [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.12, lw=0)
    for t in sorted({r["trained_depth"] for r in rows}):
        ax.axvline(t, color="r", lw=1.0, ls="-.", label=f"trained depth {t}")
    ax.set_xlabel("evaluation depth (iterations)")
    ax.set_ylabel(f"eval {metric}: {axis_label([metric])}, {METRICS[metric]}; mean over seeds", fontsize=8)
    if metric != "ce":
        ax.set_ylim(0, 1.02)  # a fraction: the whole range, so a drop is not exaggerated
    ax.set_title(f"{metric} vs depth; bands: {CONFIDENCE:.0%} CI over seeds (clipped to the range)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(sweep_dir: str | Path, records: list[dict], factor: int, metrics=("exact_match", "ce"),
          command: str = "") -> Path:  # fmt: skip
    d = Path(sweep_dir)
    meta = read_meta(d)
    commits = sorted({r.get("commit", "unknown") for r in records})
    out = [f"# Depth extrapolation: {meta.get('study_name', d.name)}", ""]
    out += [
        f"Each complete trial's final checkpoint, evaluated at depths 1 .. {factor}× its trained depth on its "
        "own eval set, under each extrapolation mode (chosen at evaluation time, no retraining): `none` runs "
        "only the trained iteration slots (cells past max_iterations are `-`), `last` reuses the last slot's "
        "per-iteration parameters for every extra iteration, `cycle` cycles through the slots. Cells: mean ± "
        f"{CONFIDENCE:.0%} CI over seeds (Student t; cut to the metric's range, then shown as [low, high]). "
        "The sweep's own cells only: its lr-tuning trials are not evaluated.",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Evaluated at git commit(s): {', '.join(f'`{c}`' for c in commits) or 'unknown'}",
        "",
    ]
    for metric in metrics:
        rows = summarise(records, metric, factor)
        name = "extrapolation.png" if metric == metrics[0] else f"extrapolation_{metric}.png"
        p = plot(rows, metric, d / "plots" / name)
        out += [f"## {metric} ({METRICS[metric]})", "", *_table(rows, metric), ""]
        out += [f"![{metric} vs depth](plots/{p.name})", ""]
    path = d / "EXTRAPOLATION.md"
    path.write_text("\n".join(out))
    return path
