"""Per-token halting across a finished sweep: quality against executed compute, with the Pareto plot.

    python -m asura.sweep exits DIR --exit gate:0.2,0.3 [--exit kl:0.01] [--kv copy] [--batches N]
        [--primary GROUP@RULE:T] [--max-flops 0.7]

Every complete cell of the sweep's own (not its lr-tuning trials) is evaluated from its final
checkpoint on its own eval set: at each fixed depth 1 .. n and under each exit rule and threshold at
its trained depth n (asura.analysis.depth.evaluate_exits: every token scored at its own exit, the
keys/values an exited token offers as `--kv` says). A rule the model cannot run (the gate on a model
without one) is left out of that cell. Each row carries its executed forward FLOPs per token
(asura.flops.executed_flops; under kv=full every token runs all n iterations), so fixed depths,
exit rules and other groups (e.g. the vanilla baselines) sit on one compute axis: the reference
group's full depth (the spec's `reference`, at its trained depth).

Results are kept in ``DIR/exits/<cell>.json`` (keyed by kv, rules and batches; with the record they
came from and the commit that evaluated them) and committed with the records: a rerun evaluates only
what is missing, and with every result present it rewrites EXITS.md and plots/exits.png from them
alone.

The pre-registered comparison (`primary`, fixed in the study plan before the first trial): one
group under one rule and threshold against the reference group at full depth, paired over seeds.
It meets the bar when its mean exact match lies inside the reference's 95% CI over seeds and its
executed FLOPs are at most `max_flops` of the reference's (issue #29's done criterion); the paired
difference and its test are reported beside it. Every other row is exploratory.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from asura.sweep import manifest
from asura.sweep.report import EmptySweep, own_complete_cells, read_meta, registered_protocol
from asura.sweep.stats import CONFIDENCE, clip_interval, compare_seeds, describe

RESULTS = "exits"  # DIR/exits/<cell>.json, committed with the records
EM_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class Options:
    """What to evaluate and the pre-registered comparison (see the module docstring)."""

    exits: tuple[str, ...] = ()  # "RULE[:T1,T2]" as asura.evaluate --exit
    kv: str = "copy"
    batches: int | None = None  # eval batches per trial (None: each trial's train.eval_batches)
    primary: str | None = None  # "GROUP@RULE:T"
    max_flops: float = 0.70  # the primary's executed FLOPs bar, a fraction of the reference's full depth

    def problem(self) -> str | None:
        """The first bad option as 'name: why', or None."""
        from asura.model.halting import parse_specs

        if not self.exits:
            return "no exit rule named; name at least one, e.g. gate:0.3"
        from asura.model.halting import KV_MODES

        if self.kv not in KV_MODES:
            return f"kv={self.kv!r} is not valid; choose one of {', '.join(KV_MODES)}"
        try:
            specs = parse_specs(list(self.exits), self.kv, flag="exit")
        except ValueError as e:
            return str(e)
        if self.batches is not None and (not isinstance(self.batches, int) or self.batches < 1):
            return f"batches must be an integer >= 1, got {self.batches!r}"
        if not isinstance(self.max_flops, int | float) or not 0 < self.max_flops <= 1:
            return f"max_flops must be a fraction in (0, 1], got {self.max_flops!r}"
        if self.primary is not None:
            group, at, setting = str(self.primary).partition("@")
            names = {_label(s.rule, s.tau) for s in specs}
            if not at or not group or setting not in names:
                return f"primary={self.primary!r} must be GROUP@RULE:T with RULE:T one of {', '.join(sorted(names))}"
        return None

    def specs(self):
        from asura.model.halting import parse_specs

        return parse_specs(list(self.exits), self.kv, flag="exit")


def _label(rule: str, tau) -> str:
    return f"{rule}:{tau:g}" if tau is not None and tau != float("inf") else rule


def _evaluate_trial(trial_dir: Path, specs, batches: int | None) -> dict:
    """{step, depth, fixed: [...], exits: [...]} of one trial's newest checkpoint."""
    from asura.analysis.depth import evaluate_depths, evaluate_exits
    from asura.data import build_eval_batches
    from asura.flops import executed_flops
    from asura.io.load import load

    loaded = load(trial_dir, "latest")
    cfg, n = loaded.cfg, loaded.cfg.model.iterations
    data = build_eval_batches(cfg, batches or cfg.train.eval_batches)
    fixed = [
        {"depth": r["depth"], "exact_match": r["exact_match"], "ce": r["ce"], "n_examples": r["n_examples"],
         "flops_per_token": executed_flops(cfg, {r["depth"]: 1.0})}
        for r in evaluate_depths(loaded.model, data, range(1, n + 1))
    ]  # fmt: skip
    runnable = [s for s in specs if not (s.entry.needs_gate and not cfg.model.exit_gate)]
    rows = evaluate_exits(loaded.model, cfg, data, n, runnable) if runnable else []
    keep = ("rule", "threshold", "kv", "exact_match", "ce", "n_examples", "mean_depth", "flops_per_token")
    return {"step": loaded.step, "depth": n, "fixed": fixed, "exits": [{k: r[k] for k in keep} for r in rows]}


def result_path(sweep_dir: Path, key: str) -> Path:
    """DIR/exits/<cell key as a file name>.json."""
    return manifest.cell_result_path(sweep_dir, RESULTS, key)


def evaluate_sweep(sweep_dir: str | Path, opts: Options, say=print) -> list[dict]:
    """Evaluate (or read from the committed results) every complete cell of the sweep's own."""
    d = Path(sweep_dir)
    cells = own_complete_cells(d)
    if not cells:
        raise EmptySweep(f"sweep dir {d} has no complete trials to evaluate")
    key = f"{opts.kv}:{' '.join(opts.exits)}:{opts.batches or ''}"
    out = []
    for m in cells:

        def evaluate(tdir, _missing, m=m):
            say(f"exits {m['key']}: {' '.join(opts.exits)} (kv={opts.kv})")
            return {key: _evaluate_trial(tdir, opts.specs(), opts.batches)}

        result = manifest.cell_results(d, RESULTS, m, [key], evaluate)[key]
        out.append({"key": m["key"], "group": m["group"], "seed": int(m["seed"]), **result})
    return out


def summarise(records: list[dict], reference: str) -> tuple[list[dict], dict]:
    """Rows (group × setting) with per-seed values, and the reference's full depth {seed: em, flops}."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        settings = [(f"depth {f['depth']}", f, float(f["depth"])) for f in r["fixed"]]
        settings += [(_label(e["rule"], e["threshold"]), e, e["mean_depth"]) for e in r["exits"]]
        for name, v, depth in settings:
            row = rows.setdefault((r["group"], name), {
                "group": r["group"], "setting": name, "halting": not name.startswith("depth "),
                "em": {}, "flops": {}, "depth": {},
            })  # fmt: skip
            row["em"][r["seed"]], row["flops"][r["seed"]], row["depth"][r["seed"]] = (
                float(v["exact_match"]), float(v["flops_per_token"]), float(depth))  # fmt: skip
    full = [r for r in records if r["group"] == reference]
    if not full:
        raise EmptySweep(f"the reference group {reference!r} has no complete trial to compare against")
    top = {r["seed"]: max(r["fixed"], key=lambda f: f["depth"]) for r in full}
    ref = {
        "name": f"{reference} depth {full[0]['depth']}",
        "em": {s: float(f["exact_match"]) for s, f in top.items()},
        "flops": describe([float(f["flops_per_token"]) for f in top.values()]).mean,
    }
    return list(rows.values()), ref


def _fmt(s, digits: int = 3) -> str:
    if s.n == 0:
        return "-"
    if s.half_width is None:
        return f"{s.mean:.{digits}f}"
    low, high = clip_interval(s.mean - s.half_width, s.mean + s.half_width, EM_BOUNDS)
    if (low, high) == (s.mean - s.half_width, s.mean + s.half_width):
        return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"
    return f"{s.mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _delta(row: dict, ref: dict) -> str:
    seeds = sorted(set(row["em"]) & set(ref["em"]))
    d = describe([row["em"][s] - ref["em"][s] for s in seeds])
    if d.n == 0:
        return "-"
    return f"{d.mean:+.3f}" if d.half_width is None else f"{d.mean:+.3f} ± {d.half_width:.3f}"


def table(rows: list[dict], ref: dict) -> list[str]:
    head = ["group", "setting", "seeds", "exact match", f"Δ vs {ref['name']} (paired)", "mean depth (every token)",
            f"FLOPs/token vs {ref['name']}"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flops = describe(list(r["flops"].values())).mean / ref["flops"]
        depth = describe(list(r["depth"].values())).mean
        out.append(f"| {r['group']} | {r['setting']} | {len(r['em'])} | {_fmt(describe(list(r['em'].values())))} | "
                   f"{_delta(r, ref)} | {depth:.2f} | {flops:.1%} |")  # fmt: skip
    return out


def primary(rows: list[dict], ref: dict, opts: Options, protocol=None) -> list[str]:
    """The pre-registered comparison's section (empty when the plan declares none). Under the sweep's
    registered protocol (asura.sweep.protocol) only its seeds count, and both arms must have each of
    them; below its min_seeds there is no verdict. Without a registered protocol it is exploratory."""
    if opts.primary is None:
        return []
    group, _, setting = opts.primary.partition("@")
    match = [r for r in rows if r["group"] == group and r["setting"] == setting]
    out = ["## Pre-registered comparison", ""]
    if not match:
        return [*out, f"`{opts.primary}`: no complete trial of group {group!r} ran {setting} (not evaluated).", ""]
    seeds = sorted(set(match[0]["em"]) & set(ref["em"]))
    if protocol is None:
        out += ["**Exploratory**: the sweep registered no protocol, so this comparison is not confirmatory.", ""]
    else:
        seeds = [s for s in seeds if s in protocol.seeds]
        if len(seeds) < protocol.min_seeds:
            return [*out, f"`{opts.primary}`: {len(seeds)} of the protocol's seeds are complete in both arms, "
                    f"fewer than its min_seeds={protocol.min_seeds}: too few seeds, no verdict.", ""]  # fmt: skip
    keep = lambda d: {s: d[s] for s in seeds}  # both arms over the same seeds
    row, ref = (
        {**match[0], "em": keep(match[0]["em"]), "flops": keep(match[0]["flops"])},
        {**ref, "em": keep(ref["em"])},
    )
    em, band = describe(list(row["em"].values())), describe(list(ref["em"].values()))
    ratio = describe(list(row["flops"].values())).mean / ref["flops"]
    inside = band.half_width is not None and band.low <= em.mean <= band.high
    cheap = ratio <= opts.max_flops
    cmp = compare_seeds(
        row["em"], ref["em"], direction="maximize", names=(opts.primary, ref["name"]), metric="exact match"
    )
    band_text = "no interval (n < 2)" if band.half_width is None else f"[{band.low:.3f}, {band.high:.3f}]"
    out += [
        f"`{opts.primary}` against `{ref['name']}`, seeds {seeds} (kv={opts.kv}):",
        "",
        f"- quality: mean exact match {em.mean:.3f}; the reference's {CONFIDENCE:.0%} CI over seeds is "
        f"{band_text}: **{'inside' if inside else 'outside'}**",
        f"- compute: executed FLOPs per token {ratio:.1%} of the reference's (bar: <= {opts.max_flops:.0%}): "
        f"**{'met' if cheap else 'not met'}**",
        f"- paired over seeds: {cmp.verdict}",
        "",
        f"**Bar {'met' if inside and cheap else 'not met'}** (both must hold: issue #29's done criterion).",
        "",
    ]
    return out


def plot(rows: list[dict], ref: dict, path: Path) -> Path:
    """Exact match against executed FLOPs (the reference's full depth = 1): fixed depths as lines,
    exit rules as markers, each with its CI over seeds; the Pareto frontier of the means dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors: dict[str, str] = {}
    points = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for halting in (False, True):
            sel = [r for r in rows if r["group"] == group and r["halting"] == halting]
            if not sel:
                continue
            xs = [describe(list(r["flops"].values())).mean / ref["flops"] for r in sel]
            ss = [describe(list(r["em"].values())) for r in sel]
            ys = [s.mean for s in ss]
            bands = [clip_interval(s.low, s.high, EM_BOUNDS) if s.half_width else (s.mean, s.mean) for s in ss]
            err = [[s.mean - b[0] for s, b in zip(ss, bands, strict=True)],
                   [b[1] - s.mean for s, b in zip(ss, bands, strict=True)]]  # fmt: skip
            kw = {"color": colors[group]} if group in colors else {}
            label = f"{group}: {'exit rules' if halting else 'fixed depth'}"
            cont = ax.errorbar(xs, ys, yerr=err, fmt="s" if halting else "o-", ms=4, capsize=2, lw=1,
                               label=label, **kw)  # fmt: skip
            colors.setdefault(group, cont[0].get_color())
            for x, y, r in zip(xs, ys, sel, strict=True):
                ax.annotate(r["setting"].replace("depth ", "d"), (x, y), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")  # fmt: skip
            points += list(zip(xs, ys, strict=True))
    frontier, best = [], -1.0
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            frontier.append((x, y))
            best = y
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], color="grey", ls="--", lw=0.8, label="Pareto frontier")
    ax.set_xlabel(f"executed forward FLOPs per token, fraction of {ref['name']}")
    ax.set_ylabel("answer exact match (fraction); mean over seeds")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"quality against executed compute; bars: {CONFIDENCE:.0%} CI over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def command(sweep_dir: str | Path, opts: Options) -> str:
    """The CLI command that runs (or, with every result committed, only rewrites) this evaluation."""
    args = ["python", "-m", "asura.sweep", "exits", str(manifest.shown_path(sweep_dir))]
    for e in opts.exits:
        args += ["--exit", e]
    args += ["--kv", opts.kv]
    if opts.batches:
        args += ["--batches", str(opts.batches)]
    if opts.primary:
        args += ["--primary", opts.primary, "--max-flops", f"{opts.max_flops:g}"]
    return shlex.join(args)


def write(sweep_dir: str | Path, records: list[dict], opts: Options, command: str = "") -> Path:
    d = Path(sweep_dir)
    meta = read_meta(d)
    reference = meta.get("reference")
    if not reference:
        raise EmptySweep(
            f"sweep dir {d} names no reference group (the spec's `reference:`): nothing to compare against"
        )
    rows, ref = summarise(records, reference)
    p = plot(rows, ref, d / "plots" / "exits.png")
    commits = sorted({r.get("commit", "unknown") for r in records})
    out = [f"# Per-token halting: {meta.get('study_name', d.name)}", ""]
    out += [
        "Each complete trial's final checkpoint on its own eval set (problems never trained on), at every fixed "
        f"depth and under each exit rule at its trained depth (kv={opts.kv}: "
        + ("an exited token's keys/values for later iterations are those of its last iteration, which is what "
           "a decoder that skips its iterations computes" if opts.kv == "copy" else
           "exited tokens keep iterating for the others; nothing is saved") + "). "
        "Cells: mean ± 95% CI over seeds (Student t; cut to [0, 1], then shown as [low, high]). Δ: the paired "
        "per-seed difference from the reference at full depth. Mean depth: the iterations each real token ran, "
        "prompt included (each one runs through the loop; train/halt_depth counts the scored tokens only). "
        "FLOPs: executed forward FLOPs per token "
        "(asura.flops.executed_flops of each row's measured depth distribution, exit-rule heads and gate "
        "included). Only the pre-registered comparison below is confirmatory; every other row is exploratory.",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Evaluated at git commit(s): {', '.join(f'`{c}`' for c in commits) or 'unknown'}",
        "",
    ]  # fmt: skip
    out += primary(rows, ref, opts, registered_protocol(meta))
    out += ["## All settings", "", *table(rows, ref), "", f"![exact match against executed FLOPs](plots/{p.name})", ""]
    path = d / "EXITS.md"
    path.write_text("\n".join(out))
    return path


def run(sweep_dir: str | Path, opts: Options, command: str, say=print) -> Path:
    """Evaluate what is missing, then write EXITS.md; returns its path."""
    return write(sweep_dir, evaluate_sweep(sweep_dir, opts, say=say), opts, command=command)
