"""Generate notebooks/loop_depth.ipynb and notebooks/ablations.ipynb (stored without outputs).

    python notebooks/make_notebooks.py

Edit the cells here, not in the .ipynb files, and re-run.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

CD_ROOT = """\
import os
import sys
from pathlib import Path

# Run from the repo root whether the kernel started there or in notebooks/.
if Path.cwd().name == "notebooks":
    os.chdir(Path.cwd().parent)
sys.path.insert(0, str(Path.cwd()))
"""

LOOP_DEPTH = [
    new_markdown_cell(
        "# Loop depth: sweeps, extrapolation, telemetry and early exit\n\n"
        "Analyses a trained looped model: YOUR run when `ASURA_NB_WORKDIR` names a workdir with checkpoints\n"
        "(e.g. `runs/demo` from `make demo`), else `runs/demo` if it exists, else it trains the demo config\n"
        "(2-digit addition, 600 steps, ~2-3 min on 2 CPU cores) with the real train loop. Then it\n"
        "1. evaluates ce / exact match at depths 1..max_iterations+3 (one compiled program, traced depth;\n"
        "   depths past `model.max_iterations` use the extrapolation mode chosen HERE, at evaluation time,\n"
        "   `ASURA_NB_EXTRAPOLATION`, default `last`: no retraining),\n"
        "2. looks at per-token, per-iteration telemetry through the shared head (logit lens),\n"
        "3. compares Huginn-style early-exit criteria on an accuracy-versus-mean-depth Pareto plot.\n\n"
        "Environment: `ASURA_NB_WORKDIR`, `ASURA_NB_STEP` (`latest`, `best` or a step), `ASURA_NB_EXTRAPOLATION`,\n"
        "and for training only `ASURA_NB_STEPS` (default 600) and `ASURA_NB_OVERRIDES` (space-separated\n"
        "`section.key=value`)."
    ),
    new_code_cell(
        CD_ROOT
        + """
import numpy as np

from asura.analysis import depth, exits, plots, telemetry
from asura.config import load_config
from asura.data import build_eval_batches
from asura.io import load
from asura.train.loop import run

named = os.environ.get("ASURA_NB_WORKDIR")
WORKDIR = Path(named or ("runs/demo" if Path("runs/demo/checkpoints").is_dir() else "runs/notebook_loop_depth"))
STEP = os.environ.get("ASURA_NB_STEP", "latest")
EXTRAPOLATION = os.environ.get("ASURA_NB_EXTRAPOLATION", "last")
"""
    ),
    new_markdown_cell("## Use the named run, or train one with the real train loop"),
    new_code_cell(
        """\
if load.checkpoint_steps(WORKDIR):
    print(f"analysing the trained run in {WORKDIR}")
else:
    steps = int(os.environ.get("ASURA_NB_STEPS", "600"))
    train_cfg = load_config("configs/demo.yaml", [
        f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "train.tensorboard=false", "train.progress=false",
        *os.environ.get("ASURA_NB_OVERRIDES", "").split(),  # e.g. a smaller model for CI
    ])
    summary = run(train_cfg, WORKDIR, install_signal_handlers=False)
    print(summary["status"], "step", summary["step"], "eval ce", summary["eval"].get("eval/ce"))
"""
    ),
    new_markdown_cell("## Load the model with its own saved config; choose the extrapolation mode now"),
    new_code_cell(
        """\
loaded = load.load(WORKDIR, STEP, extrapolation=EXTRAPOLATION)
model, cfg = loaded.model, loaded.cfg
print(f"step {loaded.step}: trained depth {cfg.model.iterations}, max_iterations {cfg.model.max_iterations}, "
      f"extrapolation={cfg.model.extrapolation!r} (chosen at evaluation time)")
batches = build_eval_batches(cfg, 2)
"""
    ),
    new_markdown_cell("## Depth sweep, including extrapolation beyond the trained depth"),
    new_code_cell(
        """\
DEPTHS = list(range(1, cfg.model.max_iterations + 4))
results = depth.evaluate_depths(model, batches, DEPTHS)
for r in results:
    tag = "  (extrapolated)" if r["extrapolated"] else ""
    print(f"n={r['depth']:2d}  ce {r['ce']:.4f}  token acc {r['accuracy']:.3f}  "
          f"exact match {r['exact_match']:.3f}{tag}")
fig = plots.plot_metric_vs_depth(results, ("ce",), cfg.model.iterations, cfg.model.max_iterations, title="CE")
fig2 = plots.plot_metric_vs_depth(results, ("exact_match", "accuracy"), cfg.model.iterations,
                                  cfg.model.max_iterations, title="accuracy")
"""
    ),
    new_markdown_cell(
        "## Per-token telemetry\n\n"
        "Arrays `[B, T, n]`: state norm, cosine / relative change to the previous latent (t=1 compares with\n"
        "h_0 = the embedding), KL(p_{t-1} || p_t) (NaN at t=1), entropy, per-iteration loss and correctness\n"
        "through the shared final norm + unembedding. Means are over scored (answer) tokens."
    ),
    new_code_cell(
        """\
N_TEL = max(DEPTHS)
tel, stacked = depth.batches_telemetry(model, batches, N_TEL)
mask_BT = stacked["loss_mask"]
summ = telemetry.summary(tel, mask_BT)
for k in ("norm", "rel_change", "kl_prev", "entropy", "loss", "correct"):
    print(f"{k:>10}: " + " ".join(f"{v:8.4f}" for v in summ[k]))
fig = plots.plot_iteration_curves(summ, ("loss", "kl_prev", "rel_change", "entropy"))
"""
    ),
    new_code_cell(
        """\
row = int(np.argmax(mask_BT.sum(1) > 0))  # first row with scored tokens
fig = plots.plot_convergence_heatmap(tel, "kl_prev", example=row)
fig2 = plots.plot_convergence_heatmap(tel, "loss", example=row, mask_BT=mask_BT)
"""
    ),
    new_markdown_cell(
        "## Early exit (Huginn-style, per token)\n\n"
        "Each criterion stops a token at the first iteration where it holds (KL, entropy, relative latent\n"
        "change below a threshold); the oracle stops each token at its first correct iteration, the best any\n"
        "rule could do. Every rule and the oracle choose among the same depths, the trained slots\n"
        "1..`max_iterations` (extrapolated depths are the depth sweep's question, not an exit's).\n"
        "Exits are simulated on one full-depth pass."
    ),
    new_code_cell(
        """\
N_EXIT = cfg.model.max_iterations
curves = exits.pareto(tel, mask_BT, batch=stacked, n=N_EXIT)
print(f"early exit over depths 1..{N_EXIT}")
for c in curves:
    best = int(np.argmax(c.accuracy))
    print(f"{c.name:>12}: best acc {c.accuracy[best]:.3f} at mean depth {c.mean_depth[best]:.2f}")
fig = plots.plot_exit_pareto(curves)
fig2 = plots.plot_exit_pareto(curves, metric="exact_match", title="early exit: example exact match")
"""
    ),
    new_markdown_cell(
        "## Per-token halting in the loop\n\n"
        "The same rules run inside the loop (`asura.model.halting`): a token stops iterating when its rule\n"
        "fires, and later tokens read its keys/values of its last iteration (`kv=copy`, what the KV-cached\n"
        "decoder computes) or it keeps iterating for them (`kv=full`, exits simulated as above). Per rule and\n"
        "threshold: mean exit depth, executed FLOPs against every token at the trained depth, exact match.\n"
        "Then the exit depth of every token of two eval rows."
    ),
    new_code_cell(
        """\
from asura.model.halting import HaltSpec

specs = [HaltSpec("kl", t, kv=kv) for kv in ("copy", "full") for t in (1e-3, 1e-2, 1e-1)]
for r in depth.evaluate_exits(model, cfg, batches, cfg.model.iterations, specs):
    print(f"{r['rule']:>4} {r['threshold']:<6g} kv={r['kv']:<5} mean depth {r['mean_depth']:.2f}  "
          f"FLOPs {r['flops_ratio']:.1%}  exact match {r['exact_match']:.3f}")
b = batches[0]
res = model.run_loop(b["inputs"], cfg.model.iterations, segment_ids_BT=b["segment_ids"], halt=specs[1])
fig = plots.plot_exit_depths(res.depth_BT, b["inputs"], rows=(0, 1), segment_ids_BT=b["segment_ids"],
                             title=f"exit depth per token, kl < {specs[1].tau:g} (kv=copy)")
"""
    ),
]

ABLATIONS = [
    new_markdown_cell(
        "# Ablations: read a sweep directory\n\n"
        "Reads the tables, plots and per-trial manifests written by `python -m asura.sweep SPEC --workdir DIR`.\n"
        "Nothing is run or fabricated unless asked:\n"
        "- `ASURA_SWEEP_DIR`: the sweep dir to read (default `runs/sweep`, where the README's sweep command\n"
        "  `.venv/bin/python -m asura.sweep configs/sweeps/tiny_cpu.yaml --workdir runs/sweep --workers 2` writes);\n"
        "- `ASURA_NB_RUN_SWEEP=1`: first run (or resume) that command here (about 3 minutes on 2 CPU cores).\n\n"
        "With no results in the dir, the first cell stops with the command to run."
    ),
    new_code_cell(
        CD_ROOT
        + """
import shlex
import subprocess

from IPython.display import Image, Markdown, display

from asura.analysis import sweep_results

SWEEP_DIR = Path(os.environ.get("ASURA_SWEEP_DIR", "runs/sweep"))
SWEEP = ["-m", "asura.sweep", "configs/sweeps/tiny_cpu.yaml", "--workdir", str(SWEEP_DIR), "--workers", "2"]
if os.environ.get("ASURA_NB_RUN_SWEEP") == "1":
    subprocess.run([sys.executable, *SWEEP], check=True)  # writes the report too
hint = (f"run `.venv/bin/python {shlex.join(SWEEP)}` from the repo root first (or set ASURA_NB_RUN_SWEEP=1, "
        "or ASURA_SWEEP_DIR to a sweep dir)")
res = sweep_results.read_sweep(SWEEP_DIR, missing_hint=hint)  # no results: stops here, naming the command
print(f"{len(res.manifests)} trials, {len(res.rows)} groups in {res.directory}")
"""
    ),
    new_markdown_cell("## Summary table (mean ± std over seeds; labels say iso-param / iso-FLOP / neither)"),
    new_code_cell(
        """\
display(Markdown(res.summary_md or sweep_results.rows_markdown(res.rows)))
"""
    ),
    new_markdown_cell("## The sweep's plots"),
    new_code_cell(
        """\
for p in res.plots:
    print(p.name)
    display(Image(filename=str(p)))
"""
    ),
    new_markdown_cell("## Final metrics by evaluated depth, per group"),
    new_code_cell(
        """\
fig = sweep_results.plot_depth_curves(res, "ce")
fig2 = sweep_results.plot_depth_curves(res, "exact_match")
"""
    ),
    new_markdown_cell("## Trials"),
    new_code_cell(
        """\
cols = ("trial", "group", "seed", "status", "value", "wall_s", "expected_depth")
display(Markdown(sweep_results.rows_markdown(res.manifests, cols)))
"""
    ),
]


def write(name: str, cells) -> Path:
    for i, cell in enumerate(cells):  # stable ids: regenerating changes only the cells that were edited
        cell["id"] = f"{Path(name).stem}-{i:02d}"
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = HERE / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


def main() -> None:
    for name, cells in (("loop_depth.ipynb", LOOP_DEPTH), ("ablations.ipynb", ABLATIONS)):
        print(write(name, cells))


if __name__ == "__main__":
    main()
