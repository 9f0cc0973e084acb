"""Read a sweep directory written by ``python -m asura.sweep`` (read-only; nothing is fabricated).

Layout (see ``asura.sweep.report``)::

    DIR/sweep.json                  spec meta: groups, metric, reference, ...
    DIR/trials/<id>/manifest.json   one per trial: status, value, final {depth: metrics}, accounting
    DIR/summary.md, summary.csv, trials.csv, plots/*.png   (written by the sweep's report)

Group rows are computed in memory with the sweep's own ``report.group_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class SweepResults:
    directory: Path
    meta: dict
    manifests: list[dict]  # every trial, in trial order
    rows: list[dict]  # one per group (mean ± std over seeds, label vs reference)
    summary_md: str = ""  # DIR/summary.md when the report was written
    plots: list[Path] = field(default_factory=list)  # DIR/plots/*.png


class NoSweepResults(FileNotFoundError):
    """The directory holds no sweep results; the message is one line naming the command that writes them."""

    def _render_traceback_(self) -> list[str]:
        # IPython (a notebook) shows this instead of a traceback: the message is the whole story.
        return [f"{type(self).__name__}: {self}"]


def read_sweep(directory: str | Path, missing_hint: str | None = None) -> SweepResults:
    """Load a sweep dir; ``NoSweepResults`` (one line, ending with ``missing_hint``, by default the
    command that writes the dir) when it does not exist or holds no trial manifests."""
    from asura.sweep import manifest
    from asura.sweep.report import group_rows, read_meta

    d = Path(directory).expanduser().resolve()
    hint = missing_hint or f"run `python -m asura.sweep SPEC --workdir {directory}` first"
    if not d.is_dir():
        raise NoSweepResults(f"no sweep results: {d} does not exist; {hint}")
    manifests = manifest.read_all(d)
    if not manifests:
        raise NoSweepResults(f"no sweep results: {d} has no trials/<id>/manifest.json; {hint}")
    meta = read_meta(d)
    md = d / "summary.md"
    return SweepResults(
        directory=d,
        meta=meta,
        manifests=manifests,
        rows=group_rows(manifests, meta),
        summary_md=md.read_text() if md.exists() else "",
        plots=sorted((d / "plots").glob("*.png")),
    )


def final_by_depth(results: SweepResults, metric: str = "ce") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per group: (depths, mean, std) of ``metric`` at each evaluated depth over complete seeds."""
    from asura.sweep.report import latest_per_cell

    per: dict[str, dict[int, list[float]]] = {}
    for m in latest_per_cell(results.manifests):
        if m.get("status") != "complete":
            continue
        for d, ms in (m.get("final") or {}).items():
            v = ms.get(metric)
            if isinstance(v, int | float):
                per.setdefault(m["group"], {}).setdefault(int(d), []).append(float(v))
    out = {}
    for g, by_d in per.items():
        ds = np.array(sorted(by_d))
        vals = [np.asarray(by_d[d]) for d in ds]
        out[g] = (ds, np.array([v.mean() for v in vals]), np.array([v.std() for v in vals]))
    return out


def plot_depth_curves(results: SweepResults, metric: str = "ce", ax=None):
    """Final ``metric`` versus evaluated depth, one line per group (mean ± std over seeds)."""
    from asura.analysis import units
    from asura.analysis.plots import _axes

    fig, ax = _axes(ax, figsize=(6, 4))
    for g, (ds, mean, std) in final_by_depth(results, metric).items():
        ax.errorbar(ds, mean, yerr=std, marker="o", capsize=2, label=g)
    ax.set_xlabel(f"eval {units.DEPTH}")
    ax.set_ylabel(f"{units.axis_label([metric])}, mean ± std over seeds")
    ax.set_title(f"final {metric} by depth")
    ax.legend(fontsize=7)
    return fig


def rows_markdown(rows: list[dict], cols=("group", "role", "value", "std", "label", "params_unique")) -> str:
    """A compact Markdown table of group rows (for when summary.md was not written)."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
