"""Sweep results: CSV + Markdown tables and PNG plots, built from the trial manifests.

    DIR/trials.csv     one row per trial (every status)
    DIR/summary.csv    one row per group: metric mean ± std over seeds, accounting, label
    DIR/summary.md     the same as a Markdown table, each row labelled against its reference
    DIR/plots/metric_vs_flops.png, metric_vs_params.png, ablation.png

Reference of a row: the spec's ``reference`` group when set; otherwise a baseline row is
compared with the looped group it was derived from and every other row with the first group.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from asura.sweep import manifest
from asura.sweep.compare import compare

ACCOUNTING = ("params_unique", "flops_per_token_fwd", "flops_per_token_train", "train_tokens", "train_flops")


def _si(x) -> str:
    if not isinstance(x, int | float) or not math.isfinite(x):
        return "-"
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def latest_per_cell(manifests: list[dict]) -> list[dict]:
    """The manifest that counts for each cell: its latest complete trial, else its latest trial."""
    best: dict[str, dict] = {}
    for m in manifests:  # in trial order
        cur = best.get(m["key"])
        if cur is None or m["status"] == "complete" or cur["status"] != "complete":
            best[m["key"]] = m
    return list(best.values())


def group_rows(manifests: list[dict], meta: dict) -> list[dict]:
    cells = latest_per_cell(manifests)
    order = {g: i for i, g in enumerate(meta.get("groups", []))}
    groups: dict[str, list[dict]] = {}
    for m in sorted(cells, key=lambda m: (order.get(m["group"], len(order)), m["trial"])):
        groups.setdefault(m["group"], []).append(m)
    rows = []
    for g, ms in groups.items():
        vals = [m["value"] for m in ms if m["status"] == "complete" and isinstance(m["value"], int | float)]
        first = ms[0]
        rows.append({
            "group": g,
            "role": first["role"],
            "parent": first["parent"],
            "seeds": [m["seed"] for m in ms],
            "n_complete": len(vals),
            "n_pruned": sum(m["status"] == "pruned" for m in ms),
            "n_failed": sum(m["status"] in ("failed", "interrupted") for m in ms),
            "values": vals,
            "value": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),
            "expected_depth": first["expected_depth"],
            "bptt_k": first["bptt_k"],
            **{k: first[k] for k in ACCOUNTING},
        })  # fmt: skip
    by = {r["group"]: r for r in rows}
    default_ref = meta.get("reference") or (rows[0]["group"] if rows else None)
    for r in rows:
        ref = meta.get("reference") or (r["parent"] if r["parent"] in by else default_ref)
        r["reference"] = ref
        if ref == r["group"]:
            r["label"], r["delta"] = "reference", 0.0 if r["value"] is not None else None
            continue
        if ref not in by:
            r["label"], r["delta"] = "no reference run", None
            continue
        c = compare(r, by[ref])  # label only: no kind claimed, so this never refuses
        r["label"], r["delta"] = c["label"], c["delta"]
    return rows


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict | list | tuple) else v for k, v in r.items()})


def _markdown(rows: list[dict], meta: dict) -> str:
    metric = meta.get("metric", "metric")
    head = ["group", "role", "seeds ok/run", f"{metric} mean ± std", "Δ vs ref", "params", "train FLOPs/tok",
            "tokens", "train FLOPs", "E[n]", "label vs ref", "ref"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        val = "-" if r["value"] is None else f"{r['value']:.4f} ± {r['std']:.4f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        extra = f" ({r['n_pruned']} pruned)" if r["n_pruned"] else ""
        cells = [r["group"], r["role"], f"{r['n_complete']}/{len(r['seeds'])}{extra}", val, delta,
                 _si(r["params_unique"]), _si(r["flops_per_token_train"]), _si(r["train_tokens"]),
                 _si(r["train_flops"]), f"{r['expected_depth']:.3g}", r["label"], r["reference"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out = [f"# Sweep {meta.get('study_name', '')}: {metric} ({meta.get('direction', 'minimize')})", "", *lines, ""]
    out.append("Labels: iso-param = unique params within 1%; iso-FLOP = total training FLOPs within 1% (of the ref).")
    if meta.get("impossible"):
        out += ["", "## Impossible baselines", ""]
        out += [f"- `{i['group']}`: {i['reason']}" for i in meta["impossible"]]
    return "\n".join(out) + "\n"


def _plots(rows: list[dict], plot_dir: Path, metric: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plot_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r["value"] is not None]
    paths = []
    for xkey, xlabel, fname in (
        ("train_flops", "training FLOPs (per token × tokens)", "metric_vs_flops.png"),
        ("params_unique", "unique parameters", "metric_vs_params.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for role in dict.fromkeys(r["role"] for r in done):
            rs = [r for r in done if r["role"] == role]
            ax.errorbar([r[xkey] for r in rs], [r["value"] for r in rs], yerr=[r["std"] for r in rs],
                        fmt="o", capsize=3, label=role)  # fmt: skip
            for r in rs:
                ax.annotate(r["group"], (r[xkey], r["value"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        xs = [r[xkey] for r in done]
        if max(xs) > 10 * min(xs):  # log only when the runs span more than a decade
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        # Plain tick labels: the default log labels go through mathtext, whose first parse costs seconds.
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _si(x)))
        ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} vs {xlabel.split(' (')[0]}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / fname, dpi=120)
        plt.close(fig)
        paths.append(plot_dir / fname)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(done) + 2), 4.5))
    xs = range(len(done))
    ax.bar(xs, [r["value"] for r in done], yerr=[r["std"] for r in done], capsize=3, color="#8fb3d9")
    for x, r in zip(xs, done):  # every seed, so the spread is visible and not only the std
        ax.plot([x] * len(r["values"]), r["values"], "k.", ms=4)
    refs = [r for r in done if r["label"] == "reference"]
    if refs:
        ax.axhline(refs[0]["value"], color="r", lw=0.8, ls="--", label=f"reference: {refs[0]['group']}")
        ax.legend(fontsize=7)
    ax.set_xticks(list(xs), [r["group"] for r in done], rotation=45, ha="right", fontsize=7)
    vals = [v for r in done for v in r["values"]]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = 0.1 * (hi - lo) or 0.05 * abs(hi) or 0.1
        ax.set_ylim(lo - pad - max(r["std"] for r in done), hi + pad + max(r["std"] for r in done))
    ax.set(ylabel=metric, title="ablation: mean ± std over seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(plot_dir / "ablation.png", dpi=120)
    plt.close(fig)
    return [*paths, plot_dir / "ablation.png"]


TRIAL_COLS = ["trial", "key", "group", "seed", "role", "parent", "status", "metric", "value", "wall_s", *ACCOUNTING,
              "tokens_seen", "expected_depth", "depth_pmf", "bptt_k", "final", "overrides", "error"]  # fmt: skip
GROUP_COLS = ["group", "role", "parent", "reference", "label", "n_complete", "n_pruned", "n_failed", "value", "std",
              "delta", "values", "seeds", *ACCOUNTING, "expected_depth", "bptt_k"]  # fmt: skip


def read_meta(sweep_dir: str | Path) -> dict:
    """The sweep's sweep.json ({} before the runner has written it)."""
    path = Path(sweep_dir) / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(sweep_dir: str | Path) -> dict:
    """Write tables and plots for a sweep dir; returns {"rows": [...], "files": [...]}."""
    d = Path(sweep_dir)
    meta = read_meta(d)
    manifests = manifest.read_all(d)
    rows = group_rows(manifests, meta)
    _write_csv(d / "trials.csv", manifests, TRIAL_COLS)
    _write_csv(d / "summary.csv", rows, GROUP_COLS)
    (d / "summary.md").write_text(_markdown(rows, meta))
    files = [d / "trials.csv", d / "summary.csv", d / "summary.md"]
    if rows:
        files += _plots(rows, d / "plots", meta.get("metric", "metric"))
    return {"rows": rows, "files": files}
