"""The table of results/halting/exploratory/README.md from its JSON files (run from the repo root):

python results/halting/exploratory/table.py
"""

import json
from pathlib import Path

from asura.config import load_config
from asura.flops import executed_flops
from asura.sweep.stats import describe

HERE = Path(__file__).parent
SEEDS = (0, 1, 2)
CFG = load_config("configs/demo.yaml", ["model.guidance=none", "model.exit_gate=true", "model.exit_entropy=0.05"])


def cells(values, deltas) -> str:
    m, d = describe(values), describe(deltas)
    return f"{m.mean:.3f} ± {m.half_width:.3f} | {d.mean:+.3f} ± {d.half_width:.3f}"


def main() -> None:
    fixed: dict[int, dict[int, float]] = {}
    exits: dict[tuple, list[dict]] = {}
    for s in SEEDS:
        for kv in ("copy", "full"):
            run = json.loads((HERE / f"gate_demo_seed{s}_{kv}.json").read_text())
            for r in run["depths"]:
                fixed.setdefault(r["depth"], {})[s] = r["exact_match"]
            for r in run["exits"]:
                exits.setdefault((r["rule"], r["threshold"], kv), []).append({**r, "seed": s})
    full = fixed[max(fixed)]
    print("| arm | kv | exact match, mean ± 95% CI | Δ vs depth 3, paired mean ± 95% CI | mean exit depth "
          "| executed FLOPs vs depth 3 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n, by_seed in sorted(fixed.items()):
        ratio = executed_flops(CFG, {n: 1.0}) / executed_flops(CFG, {max(fixed): 1.0})
        em = [by_seed[s] for s in SEEDS]
        print(f"| fixed depth {n} | - | {cells(em, [by_seed[s] - full[s] for s in SEEDS])} | {n} | {ratio:.1%} |")
    for (rule, tau, kv), rs in exits.items():
        em, delta = [r["exact_match"] for r in rs], [r["exact_match"] - full[r["seed"]] for r in rs]
        depth = describe([r["mean_depth"] for r in rs]).mean
        flops = describe([r["flops_ratio"] for r in rs]).mean
        print(f"| {rule} {tau:g} | {kv} | {cells(em, delta)} | {depth:.2f} | {flops:.1%} |")


if __name__ == "__main__":
    main()
