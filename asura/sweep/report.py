"""Sweep results: CSV + Markdown tables, PNG plots and REPORT.md, built from the trial manifests.

    DIR/trials.csv     one row per trial (every status)
    DIR/summary.csv    one row per group: mean, std, 95% CI over seeds, accounting, label and
                       verdict against its reference
    DIR/summary.md     the same as a Markdown table
    DIR/REPORT.md      tables, verdicts, plots, the commands that made them, the git commit and
                       the trials' total wall time: the one file to read or send
    DIR/plots/metric_vs_flops.png, metric_vs_params.png, ablation.png

Data flow: manifests -> ``latest_per_cell`` -> ``group_rows`` (the metric read from each trial's
final eval, ``asura.sweep.stats`` for intervals and tests, ``compare.label`` for iso-param /
iso-FLOP / neither) -> tables, plots, REPORT.md.

Invariants:

* Every row's number is the same quantity: the metric (default: the sweep's, else ``ce``, the
  final-iteration cross-entropy) read from each trial's final eval at metric@depth or its training
  depth, by ``metrics.metric_value`` (what the runner reads). A metric whose meaning depends on the
  config (``objective``: guidance weights, z-loss) over runs that differ there is refused
  (``ReportRefused``, one line) before anything is written.
* Reference of a row: the spec's ``reference`` group when set; otherwise a baseline row is compared
  with the looped group it was derived from and every other row with the first group.
* A dir without trial manifests is refused (``EmptySweep``) before anything is written, so a
  mistyped path never gains empty tables.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asura.analysis.units import axis_label
from asura.baselines import TOLERANCES
from asura.sweep import manifest
from asura.sweep.compare import compare
from asura.sweep.keys import format_overrides
from asura.sweep.metrics import (
    DEFAULT_METRIC,
    MetricError,
    MetricMissing,
    MetricSpec,
    incomparable,
    metric_value,
    parse_metric,
)
from asura.sweep.protocol import MIN_SEEDS, Protocol
from asura.sweep.stats import (
    ALPHA,
    CONFIDENCE,
    NO_TEST,
    PAIRED,
    clip_interval,
    compare_seeds,
    decimals,
    describe,
    holm,
    learned_rates,
    signed_rank_p,
)
from asura.sweep.tuning import ROLE as TUNE_ROLE
from asura.sweep.tuning import TuneSpec, choose


class EmptySweep(FileNotFoundError):
    """The sweep dir does not exist or holds no trials/<id>/manifest.json; one line."""


class ReportRefused(ValueError):
    """The asked metric cannot be tabulated honestly for these trials; one line."""


ACCOUNTING = ("params_unique", "flops_per_token_fwd", "flops_per_token_train", "train_tokens", "train_flops")
PLOTS = (
    ("metric_vs_flops.png", "training FLOPs (per token × tokens)"),
    ("metric_vs_params.png", "unique parameters (count)"),
    ("ablation.png", "per group"),
    ("learning_curves.png", "during training"),
)


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


def own_complete_cells(sweep_dir) -> list[dict]:
    """The sweep's own cells (not its lr-tuning trials) whose latest trial completed: what is
    evaluated again from its checkpoint (depth extrapolation, exit rules)."""
    return [
        m
        for m in latest_per_cell(manifest.read_all(Path(sweep_dir)))
        if m["status"] == "complete" and m.get("role") != TUNE_ROLE
    ]


def resolve_metric(meta: dict, manifests: Sequence[dict], metric: str | None = None) -> MetricSpec:
    """The metric to tabulate: ``metric`` if given, else the sweep's, else the trials', else ``ce``."""
    raw = metric or meta.get("metric") or next((m["metric"] for m in manifests if m.get("metric")), DEFAULT_METRIC)
    try:
        return parse_metric(raw)
    except MetricError as e:
        raise ReportRefused(str(e)) from None


def _dig(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def read_value(m: dict, metric: MetricSpec) -> float:
    """One complete trial's metric: from its final eval at metric@depth or its training depth."""
    final, cfg = m.get("final"), m.get("config")
    if final and cfg:
        try:
            return metric_value(metric, int(cfg["model"]["iterations"]), final)
        except MetricMissing as e:
            raise ReportRefused(f"trial {m['trial']} ({m['key']}): {e}") from None
    if m.get("metric") == metric.label and isinstance(m.get("value"), int | float):
        return float(m["value"])  # a manifest without its final eval: its recorded value, if it is this metric
    where = f"trial {m['trial']} ({m['key']})"
    raise ReportRefused(f"{where} recorded {m.get('metric')!r} and has no final eval to read {metric.label} from")


def _check_comparable(metric: MetricSpec, cells: list[dict]) -> None:
    if not metric.entry.same_config:
        return
    for m in cells:
        if not isinstance(m.get("config"), dict):
            raise ReportRefused(f"metric={metric.name}: trial {m['trial']} ({m['key']}) has no config to check it by")
    reason = incomparable(metric, [(m["key"], lambda k, c=m["config"]: _dig(c, k)) for m in cells])
    if reason:
        raise ReportRefused(reason)


def group_rows(manifests: list[dict], meta: dict, metric: str | MetricSpec | None = None) -> list[dict]:
    """One row per group: the metric over complete seeds (mean, std, 95% CI), accounting, and the
    label and verdict against the row's reference. ``ReportRefused`` when the metric cannot be read
    or compared for these trials."""
    spec = metric if isinstance(metric, MetricSpec) else resolve_metric(meta, manifests, metric)
    cells = [m for m in latest_per_cell(manifests) if m.get("role") != TUNE_ROLE]  # tuning: its own table
    complete = [m for m in cells if m["status"] == "complete"]
    _check_comparable(spec, complete)
    order = {g: i for i, g in enumerate(meta.get("groups", []))}
    groups: dict[str, list[dict]] = {}
    for m in sorted(cells, key=lambda m: (order.get(m["group"], len(order)), m["trial"])):
        groups.setdefault(m["group"], []).append(m)
    rows = []
    for g, ms in groups.items():
        by_seed = {m["seed"]: read_value(m, spec) for m in ms if m["status"] == "complete"}
        s = describe(list(by_seed.values()))
        first = ms[0]
        rows.append({
            "group": g,
            "role": first["role"],
            "parent": first["parent"],
            "seeds": [m["seed"] for m in ms],
            "keys": [m["key"] for m in ms],
            "n_complete": s.n,
            "n_pruned": sum(m["status"] == "pruned" for m in ms),
            "n_failed": sum(m["status"] in ("failed", "interrupted") for m in ms),
            "values": list(by_seed.values()),
            "by_seed": by_seed,
            "value": s.mean,
            "std": s.std,
            "ci95": s.half_width,
            "ci_low": s.low,
            "ci_high": s.high,
            "expected_depth": first["expected_depth"],
            "bptt_k": first["bptt_k"],
            "params_trained": first.get("params_trained"),  # None in manifests from before the count
            **{k: first[k] for k in ACCOUNTING},
        })  # fmt: skip
    for r in rows:  # an interval cannot leave the metric's range (exact match in [0, 1])
        r["ci_low"], r["ci_high"] = clip_interval(r["ci_low"], r["ci_high"], spec.entry.bounds)
    _compare_rows(rows, meta, spec)
    return rows


def registered_protocol(meta: dict) -> Protocol | None:
    return Protocol.from_json((meta.get("protocol") or {}).get("protocol"))


def _compare_rows(rows: list[dict], meta: dict, spec: MetricSpec) -> None:
    """Each row against its reference: the difference, the tests, Holm over the family, the verdict.

    Under a registered protocol (asura.sweep.protocol) only its seeds count, its family is
    corrected together and only the family gets confirmatory verdicts; without one every row is
    tested over all its complete seeds, corrected over all rows, and labelled exploratory. Below
    the minimum number of seeds no test is run ("too few seeds")."""
    protocol = registered_protocol(meta)
    primary = protocol is not None and spec.label == meta.get("metric")
    min_seeds = protocol.min_seeds if protocol else MIN_SEEDS
    by = {r["group"]: r for r in rows}
    default_ref = meta.get("reference") or (rows[0]["group"] if rows else None)
    compared = []
    for r in rows:
        ref = meta.get("reference") or (r["parent"] if r["parent"] in by else default_ref)
        r["reference"] = ref
        r.update(delta_ci95=None, test=None, p=None, better=None, p_holm=None, p_wilcoxon=None,
                 p_wilcoxon_holm=None, learned=None, p_fisher=None, p_fisher_holm=None, n_tested=None,
                 confirmatory=False)  # fmt: skip
        if ref == r["group"]:
            r["label"], r["delta"], r["verdict"] = "reference", 0.0 if r["value"] is not None else None, "reference"
            continue
        if ref not in by:
            r["label"], r["delta"], r["verdict"] = "no reference run", None, "no reference run"
            continue
        r["label"] = compare(r, by[ref])["label"]  # label only: no kind claimed, so this never refuses
        keep = (lambda s: s in protocol.seeds) if protocol else (lambda s: True)
        a = {s: v for s, v in r["by_seed"].items() if keep(s)}
        b = {s: v for s, v in by[ref]["by_seed"].items() if keep(s)}
        t = compare_seeds(a, b, direction=spec.direction, names=(r["group"], ref), metric=spec.label,
                          kind=r["label"])  # fmt: skip
        r["in_family"] = protocol is not None and (protocol.family is None or r["group"] in protocol.family)
        # Only the primary metric is confirmatory: a report on another metric (REPORT_ce.md) is exploratory.
        r["confirmatory"] = r["in_family"] and primary
        r.update(delta=t.diff, delta_ci95=t.half_width, test=t.method, better=t.better, n_tested=min(len(a), len(b)))
        r["_t"] = t
        if r["n_tested"] < min_seeds:
            r["verdict"] = (f"too few seeds: {r['n_tested']} complete{' protocol' if protocol else ''} seeds per arm "
                            f"(minimum {min_seeds}); not tested")  # fmt: skip
            r["test"] = NO_TEST
            continue
        r["p"] = t.p
        r["p_wilcoxon"] = signed_rank_p(a, b) if t.method != NO_TEST and set(a) == set(b) else None
        if primary and protocol.learned is not None:  # the threshold is on the primary metric
            lr = learned_rates(list(a.values()), list(b.values()), protocol.learned, spec.direction)
            r["learned"], r["p_fisher"] = f"{lr.k_a}/{lr.n_a} vs {lr.k_b}/{lr.n_b}", lr.p
        compared.append(r)
    family = [r for r in compared if r["in_family"]] if protocol else compared
    for key in ("p", "p_wilcoxon", "p_fisher"):
        for g, q in holm({r["group"]: r[key] for r in family}).items():
            by[g][f"{key}_holm"] = q
    for r in compared:
        r["verdict"] = _verdict(r, spec, corrected=r in family, exploratory=not r["confirmatory"])
    for r in rows:
        r.pop("_t", None)
        r.pop("in_family", None)


def _verdict(r: dict, spec: MetricSpec, corrected: bool, exploratory: bool) -> str:
    t = r.pop("_t")
    tag = "exploratory: " if exploratory else ""
    if t.method == NO_TEST:  # zero spread, or a group without seeds: the test's own words
        return tag + t.verdict
    p = r["p_holm"] if corrected else r["p"]
    parts = [r["label"], f"{t.method} {'Holm ' if corrected else ''}p = {p:.2g}"]
    if r["p_wilcoxon"] is not None:
        w = r["p_wilcoxon_holm"] if corrected else r["p_wilcoxon"]
        parts.append(f"Wilcoxon {'Holm ' if corrected else ''}p = {w:.2g}")
    if r["learned"] is not None:
        f = r["p_fisher_holm"] if corrected else r["p_fisher"]
        parts.append(f"learned {r['learned']}, Fisher {'Holm ' if corrected else ''}p = {f:.2g}")
    parts.append(f"n = {t.n_a} seeds" if t.method == PAIRED else f"n = {t.n_a} vs {t.n_b} seeds")
    how = ", ".join(parts)
    dec = decimals(t.half_width or 0.0)
    unit = f" {spec.label}"
    if p < ALPHA:
        better = r["group"] if (t.diff < 0) == (spec.direction == "minimize") else r["reference"]
        worse = r["reference"] if better == r["group"] else r["group"]
        r["better"] = better
        return f"{tag}{better} beats {worse} by {abs(t.diff):.{dec}f} ± {t.half_width:.{dec}f}{unit} ({how})"
    r["better"] = None
    diff = f"{r['group']} − {r['reference']} = {t.diff:+.{dec}f} ± {t.half_width:.{dec}f}{unit}"
    return f"{tag}no significant difference: {diff} ({how})"


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict | list | tuple) else v for k, v in r.items()})


def _fmt_mean(r: dict) -> str:
    if r["value"] is None:
        return "-"
    if r["ci95"] is None:
        return f"{r['value']:.4f} (n = 1, no CI)"
    if r["ci_high"] - r["value"] != r["value"] - r["ci_low"]:  # cut to the metric's range: say where
        return f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
    return f"{r['value']:.4f} ± {r['ci95']:.4f}"


def _fmt_delta(r: dict) -> str:
    if r["delta"] is None:
        return "-"
    if r["delta_ci95"] is None or r["label"] == "reference":
        return f"{r['delta']:+.4f}"
    return f"{r['delta']:+.4f} ± {r['delta_ci95']:.4f}"


def _table(rows: list[dict], metric: MetricSpec) -> list[str]:
    head = ["group", "role", "seeds ok/run", f"{metric.label} mean ± 95% CI", "std", "Δ vs ref ± 95% CI", "test",
            "p", "p (Holm)", "Wilcoxon p (Holm)", "learned", "trained params", "train FLOPs/tok", "tokens",
            "train FLOPs", "E[n]", "label vs ref", "ref", "verdict vs ref"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        extra = f" ({r['n_pruned']} pruned)" if r["n_pruned"] else ""
        cells = [r["group"], r["role"], f"{r['n_complete']}/{len(r['seeds'])}{extra}", _fmt_mean(r),
                 "-" if r["std"] is None else f"{r['std']:.4f}", _fmt_delta(r), r["test"] or "-",
                 _fmt_p(r["p"]), _fmt_p(r["p_holm"]), _fmt_p(r["p_wilcoxon_holm"]), r["learned"] or "-",
                 _si(r.get("params_trained") or r["params_unique"]), _si(r["flops_per_token_train"]),
                 _si(r["train_tokens"]), _si(r["train_flops"]), f"{r['expected_depth']:.3g}", r["label"],
                 r["reference"], r["verdict"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def _legend() -> list[str]:
    conf = f"{CONFIDENCE:.0%}"
    return [
        f"Labels: iso-param = trained params within {TOLERANCES['iso-param']:.0%} (unique params for trials "
        f"recorded before the trained count); iso-FLOP = total training FLOPs within {TOLERANCES['iso-FLOP']:.0%} "
        "(of the ref); neither = no fair-comparison claim.",
        f"Statistics over seeds: {conf} CI = mean ± t·s/√n (Student t, n-1 df), cut to the metric's range (then "
        "shown as [low, high]); each row is tested against its ref with a paired t-test when both ran the same "
        "seeds (same seed: same data order and init stream), else Welch's unpaired t-test, and with the Wilcoxon "
        "signed-rank test when paired; p-values are Holm-corrected over the family (the protocol's, else every "
        f"tested row); a verdict needs the corrected t-test p < {ALPHA:.2g} (two-sided); below the minimum number "
        "of seeds nothing is tested. The Δ interval is the uncorrected 95% CI.",
    ]


def _protocol_md(meta: dict, metric: str | None = None) -> list[str]:
    reg = meta.get("protocol")
    protocol = registered_protocol(meta)
    if protocol is None:
        return ["## Protocol", "", f"None registered: every verdict below is **exploratory** (all rows corrected "
                f"together; no verdict under {MIN_SEEDS} seeds).", ""]  # fmt: skip
    fam = ", ".join(f"`{g}`" for g in protocol.family) if protocol.family else "every row but the reference"
    late = reg.get("complete_before")
    before = f"{late} trials had run" if late else "any trial had run"
    out = ["## Protocol", "", f"Registered at commit `{reg.get('commit')}` ({reg.get('registered')}), before {before}."]
    if late:
        out[-1] += " **Registered late: the verdicts are exploratory in substance.**"
    out += [
        "",
        f"- primary metric: `{meta.get('metric')}` ({meta.get('direction')})",
        f"- confirmatory seeds: {list(protocol.seeds)}; minimum per arm: {protocol.min_seeds}",
        f"- family (Holm-corrected together): {fam}",
        "- tests: paired t-test (decides), Wilcoxon signed-rank"
        + (
            f", Fisher's exact test on learned rates (learned: {meta.get('metric')} past {protocol.learned})"
            if protocol.learned is not None
            else ""
        ),
        "- rows outside the family and seeds outside the list are exploratory",
        "",
    ]
    if metric is not None and metric != meta.get("metric"):
        out += [f"This report's metric, `{metric}`, is not the primary metric: **every verdict below is exploratory** "
                "(the family is still Holm-corrected together; the learned threshold belongs to the primary metric).",
                ""]  # fmt: skip
    return out


def _impossible(meta: dict) -> list[str]:
    if not meta.get("impossible"):
        return []
    return ["", "## Impossible baselines", "", *[f"- `{i['group']}`: {i['reason']}" for i in meta["impossible"]]]


def _markdown(rows: list[dict], meta: dict, metric: MetricSpec) -> str:
    out = [f"# Sweep {meta.get('study_name', '')}: {metric.label} ({metric.direction})", "", *_table(rows, metric), ""]
    out += _legend()
    out += _impossible(meta)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ plots


def metric_axis(metric: MetricSpec) -> str:
    """``ce: cross-entropy (nats/token), minimize``: the name tables use, the quantity with its unit, the goal."""
    return f"{metric.label}: {axis_label([metric.name])}, {metric.direction}"


def _err(rows: list[dict]) -> list[list[float]]:
    """Error bars [below, above]: the 95% CI cut to the metric's range; 0 (no bar) for a single seed."""
    below = [0.0 if r["ci95"] is None else r["value"] - r.get("ci_low", r["value"] - r["ci95"]) for r in rows]
    above = [0.0 if r["ci95"] is None else r.get("ci_high", r["value"] + r["ci95"]) - r["value"] for r in rows]
    return [below, above]


def draw_metric_vs(ax, rows: list[dict], xkey: str, xlabel: str, metric: MetricSpec):
    """Metric (y) against one accounting quantity (x), one marker per group, 95% CI error bars."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    done = [r for r in rows if r["value"] is not None]
    for role in dict.fromkeys(r["role"] for r in done):
        rs = [r for r in done if r["role"] == role]
        ax.errorbar([r[xkey] for r in rs], [r["value"] for r in rs], yerr=_err(rs), fmt="o", capsize=3, label=role)
        for r in rs:
            ax.annotate(r["group"], (r[xkey], r["value"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    xs = [r[xkey] for r in done]
    if xs and max(xs) > 10 * min(xs):  # log only when the runs span more than a decade
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    # Plain tick labels: the default log labels go through mathtext, whose first parse costs seconds.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _si(x)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_axis(metric)}; mean over seeds", fontsize=8)
    ax.set_title(f"{metric.label} vs {xlabel.split(' (')[0]}; bars: {CONFIDENCE:.0%} CI (none for n = 1)")
    if done:
        ax.legend(fontsize=7)
    return ax


def draw_ablation(ax, rows: list[dict], metric: MetricSpec):
    """Dot plot: each group's mean with its 95% CI, every seed as a small dot, the reference as a line.

    Dots, not bars: a bar's length reads as the quantity, which is only honest from 0, and a loss
    axis from 0 would flatten the differences that matter.
    """
    done = [r for r in rows if r["value"] is not None]
    xs = list(range(len(done)))
    for x, r in zip(xs, done):
        ax.plot([x] * len(r["values"]), r["values"], ".", color="0.6", ms=4, zorder=1)
    ax.errorbar(xs, [r["value"] for r in done], yerr=_err(done), fmt="o", color="k", capsize=4, zorder=2,
                label=f"mean ± {CONFIDENCE:.0%} CI")  # fmt: skip
    refs = [r for r in done if r["label"] == "reference"]
    if refs:
        ax.axhline(refs[0]["value"], color="r", lw=0.8, ls="--", label=f"reference: {refs[0]['group']}")
    ax.set_xticks(xs, [r["group"] for r in done], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("group")
    ax.set_ylabel(metric_axis(metric), fontsize=8)
    ax.set_title(f"{metric.label} per group: mean, {CONFIDENCE:.0%} CI over seeds, each seed (grey)", fontsize=9)
    if done:
        ax.legend(fontsize=7)
    return ax


@dataclass(frozen=True)
class Curve:
    """One group's eval metric during training, over its complete seeds, keyed by eval step."""

    steps: list[int]
    mean: list[float]
    low: list[float]  # min over seeds
    high: list[float]  # max over seeds
    n: list[int]  # seeds with an eval at that step
    tokens_per_step: float  # planned training tokens / steps (batch × seq_len)


def learning_curves(rows: list[dict], manifests: list[dict], metric: MetricSpec) -> dict[str, Curve]:
    """Each group's metric at every eval step, from the trials' recorded evals (the learning curve
    the plot draws and the table and crossing points read)."""
    by_key = {m["key"]: m for m in latest_per_cell(manifests)}
    out = {}
    for r in (r for r in rows if r["value"] is not None):
        per_step: dict[int, list[float]] = {}
        tokens_per_step = math.nan
        for m in (by_key.get(k) for k in r.get("keys", ())):
            if m is None or m["status"] != "complete":
                continue
            trained = int(m["config"]["model"]["iterations"])
            tokens_per_step = m["train_tokens"] / int(m["config"]["train"]["steps"])
            for e in m.get("evals") or []:
                with contextlib.suppress(MetricMissing):  # an eval that skipped this depth
                    per_step.setdefault(int(e["step"]), []).append(metric_value(metric, trained, e["depths"]))
        if per_step:
            steps = sorted(per_step)
            vals = [per_step[s] for s in steps]
            out[r["group"]] = Curve(steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals],
                                    [max(v) for v in vals], [len(v) for v in vals], tokens_per_step)  # fmt: skip
    return out


def crossing(curve: Curve, ref: Curve, direction: str) -> int | None:
    """The first eval step from which ``curve``'s mean is better than ``ref``'s at every later step
    both evaluated (a sustained crossing; descriptive, no test), else None. Compared at equal
    training tokens only, so the two must train the same tokens per step."""
    if not math.isclose(curve.tokens_per_step, ref.tokens_per_step):
        return None
    at = dict(zip(ref.steps, ref.mean))
    common = [(s, m, at[s]) for s, m in zip(curve.steps, curve.mean) if s in at]
    first = None
    for s, m, r in common:
        ahead = m < r if direction == "minimize" else m > r
        first = (first if first is not None else s) if ahead else None
    return first


def _curves_md(rows: list[dict], curves: dict[str, Curve], metric: MetricSpec) -> list[str]:
    """The learning curves as a table (mean over seeds at each eval step, with the tokens seen) and,
    for each row, where its mean curve crosses its reference's for good."""
    if not curves:
        return []
    groups = [r["group"] for r in rows if r["group"] in curves]
    steps = sorted({s for g in groups for s in curves[g].steps})
    tps = curves[groups[0]].tokens_per_step
    head = ["step", "tokens", *groups]
    out = ["## Learning curves", "", f"Eval `{metric.label}` at each eval step, mean over each group's complete seeds "
           "(the trials' recorded evals; seeds outside the protocol included). Tokens = step × planned tokens "
           "per step (a group that trains a different number per step shows its own in brackets).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for s in steps:
        cells = []
        for g in groups:
            c = curves[g]
            if s not in c.steps:
                cells.append("-")
                continue
            i = c.steps.index(s)
            own = "" if math.isclose(c.tokens_per_step, tps) else f" ({_si(s * c.tokens_per_step)})"
            cells.append(f"{c.mean[i]:.4f}{own}")
        out.append(f"| {s} | {_si(s * tps)} | " + " | ".join(cells) + " |")
    out += ["", "Crossing points (descriptive: means, no test): the first eval step from which a group's mean "
            "stays better than its reference's at every later step, at equal tokens.", ""]  # fmt: skip
    for r in rows:
        ref = r.get("reference")
        if r["group"] not in curves or ref not in curves or ref == r["group"]:
            continue
        c, rc = curves[r["group"]], curves[ref]
        if not math.isclose(c.tokens_per_step, rc.tokens_per_step):
            out.append(f"- `{r['group']}` vs `{ref}`: not compared (different tokens per step)")
            continue
        at = crossing(c, rc, metric.direction)
        where = "never within this budget" if at is None else f"from step {at} ({_si(at * c.tokens_per_step)} tokens)"
        if at is not None and at == min(set(c.steps) & set(rc.steps)):
            where = f"at every eval (from step {at}, {_si(at * c.tokens_per_step)} tokens)"
        out.append(f"- `{r['group']}` better than `{ref}`: {where}")
    return out


def _gap_md(rows: list[dict], manifests: list[dict], metric: MetricSpec) -> list[str]:
    """Train vs eval ce at the end, per group, from the records' train curves (ce reports only:
    ``train/ce`` is the training loss's final-iteration ce on the batches trained on)."""
    if metric.label != "ce":
        return []
    by_key = {m["key"]: m for m in latest_per_cell(manifests)}
    lines = []
    for r in rows:
        ms = [by_key.get(k) for k in r.get("keys", ())]
        pairs = [(m["train"][-1]["ce"], read_value(m, metric)) for m in ms
                 if m is not None and m["status"] == "complete" and m.get("train")]  # fmt: skip
        if pairs:
            tr, ev = (sum(x) / len(pairs) for x in zip(*pairs))
            lines.append(f"| {r['group']} | {len(pairs)} | {tr:.4f} | {ev:.4f} | {ev - tr:+.4f} |")
    if not lines:
        return []
    head = ["", "## Train vs eval", "", "Mean over complete seeds: train ce = the logged training ce averaged over the "
            "last eval interval (the batches trained on), eval ce = the primary metric at the end; gap = eval − train.",
            "", "| group | seeds | train ce | eval ce | gap |", "|---|---|---|---|---|"]  # fmt: skip
    return [*head, *lines]


def draw_learning_curves(ax, curves: dict[str, Curve], metric: MetricSpec):
    """Each group's metric at every eval step (mean over its complete seeds; band: min..max), so a
    reader can see whether every arm had learned, or was still learning, when the sweep stopped."""
    for g, c in curves.items():
        (line,) = ax.plot(c.steps, c.mean, marker=".", label=g)
        ax.fill_between(c.steps, c.low, c.high, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"eval {metric_axis(metric)}", fontsize=8)
    ax.set_title(f"eval {metric.label} during training: mean over seeds, band min..max", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    return ax


def _plots(rows: list[dict], curves: dict[str, Curve], plot_dir: Path, metric: MetricSpec) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (fname, xlabel), xkey in zip(PLOTS, ("train_flops", "params_unique")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_metric_vs(ax, rows, xkey, xlabel, metric)
        fig.tight_layout()
        fig.savefig(plot_dir / fname, dpi=120)
        plt.close(fig)
        paths.append(plot_dir / fname)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4.5))
    draw_ablation(ax, rows, metric)
    fig.tight_layout()
    fig.savefig(plot_dir / PLOTS[2][0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_learning_curves(ax, curves, metric)
    fig.tight_layout()
    fig.savefig(plot_dir / PLOTS[3][0], dpi=120)
    plt.close(fig)
    return [*paths, plot_dir / PLOTS[2][0], plot_dir / PLOTS[3][0]]


# ------------------------------------------------------------------ REPORT.md


def report_command(sweep_dir: Path, metric: str | None = None) -> str:
    """The command that rebuilds this report; a dir inside the repository is named relative to its
    root, so a report regenerated from the committed records in another clone reads the same."""
    args = ["python", "-m", "asura.sweep", "report", str(manifest.shown_path(sweep_dir))]
    return shlex.join([*args, "--metric", metric] if metric else args)


def _wall(manifests: list[dict]) -> str:
    total = sum(float(m.get("wall_s") or 0.0) for m in manifests)
    status = {s: sum(m["status"] == s for m in manifests) for s in dict.fromkeys(m["status"] for m in manifests)}
    counts = ", ".join(f"{n} {s}" for s, n in status.items())
    h, rem = divmod(total, 3600)
    mins, secs = divmod(rem, 60)
    hms = f"{int(h)}h {int(mins):02d}m {secs:04.1f}s" if h else f"{int(mins)}m {secs:04.1f}s"
    return f"{total:.1f} s ({hms}), summed over all {len(manifests)} trials ({counts}), retries included"


def _report_md(rows, meta, metric, manifests, curves, plots, command, commit) -> str:
    out = [f"# Sweep report: {meta.get('study_name') or '(no sweep.json)'}", ""]
    out += [f"Metric: `{metric.label}`: {metric.entry.doc} ({metric.direction})."]
    if meta.get("metric") and meta["metric"] != metric.label:
        out[-1] += f" The sweep optimised `{meta['metric']}`; this report tabulates `{metric.label}`."
    out += ["", "## Provenance", ""]
    runs = meta.get("commands") or []
    if runs:
        out += ["Sweep command(s), in order (each with the git commit it ran at):", ""]
        out += [
            f"- `{c['command']}` (git commit `{c.get('commit', 'unknown')}`, {c.get('started', '?')})" for c in runs
        ]
    else:
        out += ["Sweep command: not recorded (sweep.json has no `commands`)."]
    if meta.get("extra_overrides"):
        out += ["", "Overrides from outside the spec file (study preset, command line), applied to every trial: "
                f"`{format_overrides(meta['extra_overrides'])}`."]  # fmt: skip
    commits = sorted({m.get("commit") for m in manifests if m.get("commit")})
    ran = ", ".join(f"`{c}`" for c in commits) or f"not recorded in the trials (report written at `{commit}`)"
    out += ["", f"Report command: `{command}`", "", f"Trials ran at git commit(s): {ran}", ""]
    out += [f"Total trial wall time: {_wall(manifests)}.", ""]
    out += _environment_md(manifests)
    out += _protocol_md(meta, metric.label)
    out += _tuning_md(meta, manifests)
    out += ["## Results", "", *_table(rows, metric), "", *_legend(), ""]
    out += ["## Verdicts", ""]
    out += [f"- `{r['group']}` vs `{r['reference']}`: {r['verdict']}" for r in rows if r["label"] != "reference"]
    if all(r["label"] == "reference" for r in rows):
        out += ["- (only the reference ran)"]
    out += ["", *_curves_md(rows, curves, metric), *_gap_md(rows, manifests, metric)]
    if plots:
        out += ["", "## Plots", ""]
        titles = dict(PLOTS)
        out += [f"![{metric.label} {titles[p.name]}]({p.parent.name}/{p.name})" for p in plots]
    out += _impossible(meta)
    return "\n".join(out) + "\n"


def _tuning_md(meta: dict, manifests: list[dict]) -> list[str]:
    """Each group's mean primary metric per learning rate over the tuning seeds, and the lr chosen."""
    if not meta.get("tune"):
        return ["Learning rate: not tuned; every group trained at its config's `train.lr`.", ""]
    tune = TuneSpec(tuple(meta["tune"]["lr"]), tuple(meta["tune"]["seeds"]))
    chosen = choose(latest_per_cell(manifests), tune, meta.get("direction") or "minimize")
    head = ["group", *[f"lr {lr:g}" for lr in tune.lr], "chosen"]
    lrs = ", ".join(f"{x:g}" for x in tune.lr)
    out = ["## Learning-rate tuning", "", f"Each group tried lr {lrs} on tuning seeds {list(tune.seeds)} (never used "
           f"in the comparison); the {meta.get('metric')} mean over them picked the lr its sweep trials trained "
           "with.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for g in meta.get("groups", []):
        c = chosen.get(g)
        cells = [f"{c['means'][lr]:.4f}" if c else "-" for lr in tune.lr]
        out.append("| " + " | ".join([g, *cells, f"{c['lr']:g}" if c else "incomplete"]) + " |")
    return out


def _environment_md(manifests: list[dict]) -> list[str]:
    """The environments the trials ran in (XLA:CPU numbers differ across CPUs and versions)."""
    envs: dict[str, int] = {}
    for m in manifests:
        e = m.get("environment")
        if e:
            pk = ", ".join(f"{k} {v}" for k, v in e["packages"].items() if v)
            line = (f"{e['backend']} ({e['device_kind']}, {e['device_count']} device(s)), CPU {e['cpu']} x "
                    f"{e['affinity'] or e['cpu_count']} threads, Python {e['python']}, {pk}; XLA_FLAGS "
                    f"`{e['xla_flags'] or '-'}`")  # fmt: skip
            envs[line] = envs.get(line, 0) + 1
    if not envs:
        return ["Environment: not recorded in these trials.", ""]
    return ["Environment (trials):", "", *[f"- {n} trial(s): {line}" for line, n in envs.items()], ""]


TRIAL_COLS = ["trial", "key", "group", "seed", "role", "parent", "status", "metric", "value", "wall_s", *ACCOUNTING,
              "tokens_seen", "expected_depth", "depth_pmf", "bptt_k", "final", "overrides", "extra_overrides",
              "error"]  # fmt: skip
GROUP_COLS = ["group", "role", "parent", "reference", "label", "n_complete", "n_pruned", "n_failed", "value", "std",
              "ci95", "ci_low", "ci_high", "delta", "delta_ci95", "test", "p", "p_holm", "p_wilcoxon",
              "p_wilcoxon_holm", "learned", "p_fisher", "p_fisher_holm", "confirmatory", "verdict", "values",
              "by_seed", "seeds", "params_trained", *ACCOUNTING, "expected_depth", "bptt_k"]  # fmt: skip


def read_meta(sweep_dir: str | Path) -> dict:
    """The sweep's sweep.json ({} before the runner has written it)."""
    path = Path(sweep_dir) / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_report(
    sweep_dir: str | Path, metric: str | None = None, *, command: str | None = None, commit: str | None = None
) -> dict:
    """Write tables, plots and REPORT.md for a sweep dir; returns {"rows": [...], "files": [...]}.

    ``metric`` (``name[@depth]``) re-reads every trial's final eval under another registered metric;
    default: the sweep's. ``command`` is how this report was asked for (default: the CLI command
    that rebuilds it) and ``commit`` the code's git commit (default: ``git rev-parse HEAD``).
    Refusals (``EmptySweep``, ``ReportRefused``) happen before any file is written.
    """
    d = Path(sweep_dir)
    if not d.is_dir():
        raise EmptySweep(f"sweep dir {d} does not exist")
    manifests = manifest.read_all(d)
    if not manifests:
        raise EmptySweep(f"sweep dir {d} has no trials/<id>/{manifest.MANIFEST}; nothing to report")
    meta = read_meta(d)
    spec = resolve_metric(meta, manifests, metric)
    rows = group_rows(manifests, meta, spec)
    sfx = suffix(meta, spec)
    _write_csv(d / "trials.csv", manifests, TRIAL_COLS)
    _write_csv(d / f"summary{sfx}.csv", rows, GROUP_COLS)
    (d / f"summary{sfx}.md").write_text(_markdown(rows, meta, spec))
    files = [d / "trials.csv", d / f"summary{sfx}.csv", d / f"summary{sfx}.md"]
    curves = learning_curves(rows, manifests, spec)  # the plot and the table read the same curves
    plots = _plots(rows, curves, d / f"plots{sfx}", spec) if rows else []
    report = _report_md(rows, meta, spec, manifests, curves, plots, command or report_command(d, metric),
                        commit or manifest.git_commit())  # fmt: skip
    (d / f"REPORT{sfx}.md").write_text(report)
    return {"rows": rows, "files": [*files, *plots, d / f"REPORT{sfx}.md"]}


def suffix(meta: dict, metric: MetricSpec) -> str:
    """'' for the sweep's own metric; '_exact_match', '_ce_at1', ... for another, so a report under a
    second metric sits beside the first instead of overwriting it."""
    if metric.label == (meta.get("metric") or DEFAULT_METRIC):
        return ""
    return "_" + metric.label.replace("@", "_at")
