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
from pathlib import Path

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


def _evaluate_trial(trial_dir: Path, mode: str, depths: list[int], batches: int | None) -> dict:
    from asura.analysis.depth import evaluate_depths
    from asura.analysis.load import load
    from asura.data import build_eval_batches

    loaded = load(trial_dir, "latest", extrapolation=mode)
    data = build_eval_batches(loaded.cfg, batches or loaded.cfg.train.eval_batches)
    rows = evaluate_depths(loaded.model, data, depths)
    return {"step": loaded.step, "rows": {str(r["depth"]): {k: r[k] for k in METRICS} for r in rows}}


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
        for mode in modes:
            depths = [n for n in trial_depths(m["config"], factor) if runnable(m["config"], mode, n)]
            key = f"{mode}:{','.join(map(str, depths))}:{batches or ''}"
            if key not in cache:
                say(f"extrapolate {m['key']} mode={mode} depths 1..{max(depths)}")
                cache[key] = _evaluate_trial(tdir, mode, depths, batches)
                tmp = cache_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache, indent=1) + "\n")
                tmp.replace(cache_path)
            out.append({"key": m["key"], "group": m["group"], "seed": m["seed"], "mode": mode, "config": m["config"],
                        **cache[key]})  # fmt: skip
    return out


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
    ax.set_ylabel(f"eval {metric} ({METRICS[metric]}), mean over seeds")
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
