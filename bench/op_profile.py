"""Where the CPU train step spends its op time: a per-op profile of value_and_grad of the objective,
with copy/transpose work (layout changes) totalled as a share of all op time.

    .venv/bin/python bench/op_profile.py [--layers 2] [--n 3] [--d-model 256] [--seq 256] [--batch 8]
        [--remat iteration] [--calls 3] [--top 12] [--json PATH]

Op times come from the XLA:CPU thunk events of a jax.profiler trace (perfetto JSON), summed over
`--calls` warmed calls. An op counts as copy/transpose when its HLO instruction is a transpose or a
layout-changing copy, or is a fusion whose fused computation contains one: the layout-changing work
issue #18 asks to keep under 5% of op time. The classification reads the compiled HLO (asura.hlo), not
the op's name (XLA names a fusion after some of its ops, not all).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import tempfile
from pathlib import Path

import jax
from skip_cost import objective_grad, random_batch  # bench/ is on sys.path when run as a script

from asura.config.schema import ModelConfig
from asura.hlo import parse


@dataclasses.dataclass(frozen=True)
class Profile:
    op_ms: dict[str, float]  # op name -> total ms over all calls
    layout_ops: frozenset[str]  # ops that copy or transpose
    calls: int

    @property
    def total_ms(self) -> float:
        return sum(self.op_ms.values())

    @property
    def layout_ms(self) -> float:
        return sum(ms for op, ms in self.op_ms.items() if op in self.layout_ops)

    @property
    def layout_share(self) -> float:
        return self.layout_ms / self.total_ms


def profile(step, args, hlo: str, calls: int) -> Profile:
    """Sum the trace's per-op durations over `calls` calls of the compiled `step`."""
    module = parse(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(step(*args))
        (trace,) = Path(d).rglob("*.trace.json.gz")
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    op_ms: dict[str, float] = collections.Counter()
    for e in events:
        # while/conditional events span their bodies' ops, which have events of their own
        name = e.get("name", "")
        if e.get("ph") == "X" and name in module.instructions and not name.startswith(("while", "conditional", "call")):
            op_ms[name] += e["dur"] / 1e3
    return Profile(dict(op_ms), module.ops_moving_layout(), calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", default="iteration")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", help="also write the profile here")
    a = p.parse_args()
    V = 256
    cfg = ModelConfig(vocab_size=V, d_model=a.d_model, n_heads=4, n_layers=a.layers, iterations=a.n,
                      max_iterations=a.n, remat=a.remat, guidance="linear", extrapolation="none")  # fmt: skip
    batch = random_batch(a.batch, a.seq, V)
    step, state = objective_grad(cfg, batch, a.n)
    compiled = step.lower(state).compile()  # profiled and read: one compile
    for _ in range(2):  # warm
        jax.block_until_ready(compiled(state))
    prof = profile(compiled, (state,), compiled.as_text(), a.calls)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {a.layers} blocks x {a.n} iterations, "
          f"d {a.d_model}, T {a.seq}, B {a.batch}, fp32, every trick on, remat {a.remat}; {a.calls} calls")  # fmt: skip
    print(f"op time {prof.total_ms / a.calls:.1f} ms/step; copy/transpose {prof.layout_ms / a.calls:.1f} ms/step "
          f"= {100 * prof.layout_share:.1f}% of op time")  # fmt: skip
    print("| op | ms/step | share | copy/transpose |")
    print("|---|---|---|---|")
    for op, ms in sorted(prof.op_ms.items(), key=lambda kv: -kv[1])[: a.top]:
        mark = "yes" if op in prof.layout_ops else ""
        print(f"| {op} | {ms / a.calls:.1f} | {100 * ms / prof.total_ms:.1f}% | {mark} |")
    if a.json:
        record = {"op_ms": prof.op_ms, "layout_ops": sorted(prof.layout_ops), "calls": a.calls,
                  "layout_share": prof.layout_share}  # fmt: skip
        Path(a.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
