"""Depth extrapolation of a finished sweep: every complete trial's final checkpoint evaluated at
depths 1 .. factor × its trained depth under each extrapolation mode, without retraining.

    python -m asura.sweep extrapolate DIR [--factor 4] [--modes none,last,cycle] [--metric exact_match]

Per trial the results are cached in ``trials/<id>/extrapolation.json`` (keyed by checkpoint step,
mode and depths), so a rerun only evaluates what is missing. ``DIR/EXTRAPOLATION.md`` and
``DIR/plots/extrapolation.png`` then show, per (group, mode) and depth, the mean over seeds with
its 95% CI. Mode ``none`` cannot run past ``model.max_iterations``: those cells are "-", never 0.
The numbers are asura.analysis.depth.evaluate_depths' (the training eval: ``ce`` is the final
iteration's cross-entropy, ``exact_match`` the answer exact match), on each trial's own eval set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from asura.analysis.units import axis_label
from asura.sweep import manifest
from asura.sweep.report import EmptySweep, latest_per_cell, read_meta
from asura.sweep.stats import CONFIDENCE, describe

CACHE = "extrapolation.json"
MODES = ("none", "last", "cycle")
METRICS = {"ce": "minimize", "accuracy": "maximize", "exact_match": "maximize"}


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
    from asura.analysis.load import load, model_from_params, with_extrapolation
    from asura.data import build_eval_batches

    loaded = load(trial_dir, "latest")
    data = build_eval_batches(loaded.cfg, batches or loaded.cfg.train.eval_batches)
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    out = {}
    for mode, depths in depths_by_mode.items():
        model = model_from_params(with_extrapolation(loaded.cfg, mode), params)
        rows = evaluate_depths(model, data, depths)
        out[mode] = {"step": loaded.step, "rows": {str(r["depth"]): {k: r[k] for k in METRICS} for r in rows}}
    return out


def evaluate_sweep(
    sweep_dir: str | Path, factor: int = 4, modes=MODES, batches: int | None = None, say=print
) -> list[dict]:
    """Evaluate (or read from cache) every complete trial; returns one record per (trial, mode)."""
    d = Path(sweep_dir)
    cells = [m for m in latest_per_cell(manifest.read_all(d)) if m["status"] == "complete"]
    if not cells:
        raise EmptySweep(f"sweep dir {d} has no complete trials to extrapolate")
    out = []
    for m in cells:
        tdir = d / "trials" / f"{int(m['trial']):04d}"
        cache_path = tdir / CACHE
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        cfg = m["config"]
        depths = {mode: [n for n in trial_depths(cfg, factor) if runnable(cfg, mode, n)] for mode in modes}
        keys = {mode: f"{mode}:{','.join(map(str, ds))}:{batches or ''}" for mode, ds in depths.items()}
        missing = {mode: ds for mode, ds in depths.items() if keys[mode] not in cache}
        if missing:
            for mode, ds in missing.items():
                say(f"extrapolate {m['key']} mode={mode} depths 1..{max(ds)}")
            for mode, result in _evaluate_trial(tdir, missing, batches).items():
                cache[keys[mode]] = result
            manifest.write_json(cache_path, cache)
        out += [{"key": m["key"], "group": m["group"], "seed": m["seed"], "mode": mode, "config": cfg,
                 **cache[keys[mode]]} for mode in modes]  # fmt: skip
    return out


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


def _cell(s) -> str:
    if s.n == 0:
        return "-"
    return f"{s.mean:.3f}" if s.half_width is None else f"{s.mean:.3f} ± {s.half_width:.3f}"


def _table(rows: list[dict], metric: str) -> list[str]:
    top = max(max(r["depths"]) for r in rows)
    head = ["group", "mode", "trained depth", "seeds", *[f"d{n}" for n in range(1, top + 1)]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n_seeds = max((s.n for s in r["depths"].values()), default=0)
        cells = [_cell(r["depths"][n]) if n in r["depths"] else "-" for n in range(1, top + 1)]
        out.append(f"| {r['group']} | {r['mode']} | {r['trained_depth']} | {n_seeds} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"last": "-", "cycle": "--", "none": ":"}
    colors: dict[str, str] = {}
    lo, hi = (0.0, 1.0) if metric != "ce" else (0.0, float("inf"))
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
        ax.fill_between(ns, [max(lo, y - e) for y, e in zip(ys, err)], [min(hi, y + e) for y, e in zip(ys, err)],
                        color=line.get_color(), alpha=0.12, lw=0)  # fmt: skip
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
          command: str = "", commit: str | None = None) -> Path:  # fmt: skip
    d = Path(sweep_dir)
    meta = read_meta(d)
    out = [f"# Depth extrapolation: {meta.get('study_name', d.name)}", ""]
    out += [
        f"Each complete trial's final checkpoint, evaluated at depths 1 .. {factor}× its trained depth on its "
        "own eval set, under each extrapolation mode (chosen at evaluation time, no retraining): `none` runs "
        "only the trained iteration slots (cells past max_iterations are `-`), `last` reuses the last slot's "
        "per-iteration parameters for every extra iteration, `cycle` cycles through the slots. Cells: mean ± "
        f"{CONFIDENCE:.0%} CI over seeds (Student t).",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Git commit: `{commit or manifest.git_commit()}`",
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
