"""What the nonlinearities' residuals cost: asura.model.activations (custom_jvp rules for the MLP's
GeLU/SwiGLU, the xla attention's masked softmax and the norms: the backward keeps what the tangent
map needs) against the plain expressions differentiated by autodiff (they keep every intermediate),
in one process, the two programs interleaved call by call.

    .venv/bin/python bench/activation_residuals.py [--remats none,iteration,block] [--mlps gelu]
        [--layers 2] [--n 4] [--d-model 256] [--seq 128] [--batch 8] [--reps 15]

Each step is value_and_grad of the training objective of the looped model with every trick on
(L blocks x n iterations) and of its depth-matched vanilla baseline (asura.baselines.iso_flop_depth:
L·n layers), with the xla attention. The autodiff variant is the same model traced with
the plain expressions swapped in; forward values are identical (tests/test_model_activations.py).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
from skip_cost import random_batch, step_fn, timed_pair  # bench/ is on sys.path when run as a script

from asura.baselines import iso_flop_depth
from asura.config.schema import Config, DataConfig, ModelConfig
from asura.model import activations, attention, layers

# (module that calls it, name): each rule's primal, `custom_jvp.fun`, is the plain expression it
# replaced; differentiated by autodiff it keeps every intermediate.
PLAIN = {(mod, name): getattr(activations, name).fun
         for mod, names in ((layers, ("gelu_tanh", "swiglu", "normalize")), (attention, ("masked_softmax",)))
         for name in names}  # fmt: skip


@contextlib.contextmanager
def plain_autodiff():
    """Trace the model with the plain expressions (autodiff keeps every intermediate)."""
    saved = {(mod, name): getattr(mod, name) for mod, name in PLAIN}
    for (mod, name), fn in PLAIN.items():
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--remats", default="none,iteration,block")
    p.add_argument("--mlps", default="gelu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    V = 256
    batch = random_batch(args.batch, args.seq, V)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; looped L={args.layers} x n={args.n} (every trick "
          f"on) and vanilla L={args.layers * args.n}; d {args.d_model}, T {args.seq}, B {args.batch}, fp32; "
          f"{args.reps} reps")  # fmt: skip
    print("| model | mlp | remat | ms, autodiff | ms, asura | asura / autodiff |")
    print("|---|---|---|---|---|---|")
    for mlp in args.mlps.split(","):
        for remat in args.remats.split(","):
            common = dict(vocab_size=V, d_model=args.d_model, n_heads=4, remat=remat, mlp=mlp, guidance="linear",
                          extrapolation="none", attention="xla")  # fmt: skip
            looped = ModelConfig(**common, n_layers=args.layers, iterations=args.n, max_iterations=args.n)
            vanilla = iso_flop_depth(Config(model=looped, data=DataConfig(seq_len=args.seq))).model  # L·n layers
            for name, cfg, n in (("looped", looped, args.n), ("vanilla", vanilla, 1)):
                with plain_autodiff():
                    old = step_fn(cfg, batch, n)  # traced and compiled here, with the plain expressions
                new = step_fn(cfg, batch, n)
                t_old, t_new = timed_pair(old, new, args.reps)
                print(f"| {name} | {mlp} | {remat} | {1e3 * t_old.wall_s:.1f} | {1e3 * t_new.wall_s:.1f} | "
                      f"{t_new.wall_s / t_old.wall_s:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
