"""Multi-slice roofline of a preset, compiled on this CPU (issue #30): per-chip HBM, the collective
bytes per step over ICI and over DCN (read from the compiled per-slice HLO), and the step-time lower
bounds they imply at the chip table's published bandwidths, against compute at peak.

    python bench/multislice.py [--config configs/presets/looped_350m.yaml] [--rows 2] [--out DIR]

Weak scaling: every row keeps `--rows` batch rows per chip, so a chip's work and memory stay the
same and what changes with the slice count is what crosses the data-center network. Each compile
runs in its own process (asura.aot's worker); its JSON is kept in --out, and the markdown table is
printed from those files (rerun with --table-only to print it again without compiling).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from asura import aot
from asura.chips import CHIPS

GIB = 1 << 30
# (topology of one slice, slices, extra overrides): v5e-256 slices joined by DCN, and one v5p shape
SHAPES = [
    ("v5e:16x16", 1, ()),
    ("v5e:16x16", 2, ("mesh.dcn.data=2",)),
    ("v5e:16x16", 4, ("mesh.dcn.data=4",)),
    ("v5p:4x4x4", 2, ("mesh.dcn.data=2",)),
]


def _name(topology: str, slices: int) -> str:
    return f"{topology.replace(':', '_')}_x{slices}"


def compile_all(cfg_path: str, rows: int, out: Path, timeout: float, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for topology, slices, overrides in SHAPES:
        topo = aot.parse_topology(topology, slices)
        argv = ["--config", cfg_path, "--topology", topology, "--slices", str(slices), *overrides,
                "model.attention=pallas", f"train.batch_size={rows * topo.chips}", *extra]  # fmt: skip
        t0 = time.perf_counter()
        res, rc, log = aot.run_worker(argv, timeout)
        print(f"{topo.label}: rc {rc}, {time.perf_counter() - t0:.0f} s, status {res and res['status']} ({log})")
        if res is not None:
            (out / f"{_name(topology, slices)}.json").write_text(json.dumps({"argv": argv, **res}, indent=1))


def table(out: Path) -> str:
    lines = [
        "| slices x topology | chips | batch | peak HBM GiB/chip | ICI MiB/step/chip | DCN MiB/step/chip "
        "| compute ms (peak) | ICI ms (bound) | DCN ms (bound) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for topology, slices, _ in SHAPES:
        path = out / f"{_name(topology, slices)}.json"
        if not path.is_file():
            lines.append(f"| {slices} x {topology} | not compiled | | | | | | | | |")
            continue
        res = json.loads(path.read_text())
        topo = aot.parse_topology(topology, slices)
        if res["status"] != "ok":
            why = f"{res['status']}: {res.get('message', '')[:80]}"
            lines.append(f"| {topo.label} | {topo.chips} | | {why} | | | | | | |")
            continue
        roof = aot.roofline(CHIPS[topology.split(":")[0]], res)
        col = res["collectives"]
        ms = lambda x: "-" if x is None else f"{1e3 * x:.1f}"
        batch = next(a.split("=")[1] for a in res["argv"] if a.startswith("train.batch_size="))
        lines.append(
            f"| {topo.label} | {topo.chips} | {batch} | {res['memory']['peak'] / GIB:.2f} "
            f"| {col['ici']['sent'] / (1 << 20):.0f} | {col['dcn']['sent'] / (1 << 20):.1f} "
            f"| {ms(roof['compute_s'])} | {ms(roof['ici_s'])} | {ms(roof['dcn_s'])} | {res['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/presets/looped_350m.yaml")
    p.add_argument("--rows", type=int, default=2, help="batch rows per chip (weak scaling)")
    p.add_argument("--out", default="bench/multislice", help="where each compile's JSON is kept")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every compile")
    args = p.parse_args()
    if not args.table_only:
        compile_all(args.config, args.rows, Path(args.out), args.timeout, args.overrides)
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
