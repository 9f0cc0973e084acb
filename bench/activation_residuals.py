"""What the nonlinearities' residuals cost: asura.model.activations (custom_jvp rules for the MLP's
GeLU/SwiGLU, the xla attention's masked softmax and the norms: the backward keeps what the tangent
map needs) against the plain expressions differentiated by autodiff (they keep every intermediate),
in one process, the two programs interleaved call by call.

    .venv/bin/python bench/activation_residuals.py [--remats none,iteration,block] [--mlps gelu]
        [--layers 2] [--n 4] [--d-model 256] [--seq 128] [--batch 8] [--reps 15]

Each step is value_and_grad of the training objective of the looped model with every trick on
(L blocks x n iterations) and of the depth-matched vanilla model (L·n layers), as in
bench/loop_overhead.py, with the xla attention. The autodiff variant is the same model traced with
the plain expressions swapped in; forward values are identical (tests/test_model_activations.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from skip_cost import random_batch, step_fn, timed_pair  # bench/ is on sys.path when run as a script

from asura.config.schema import ModelConfig
from asura.model import attention, layers


def _plain_normalize(x, centre: bool, eps: float):
    if centre:
        x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


PLAIN = {  # (module, name) -> the expression asura.model.activations replaced
    (layers, "gelu_tanh"): lambda u: jax.nn.gelu(u, approximate=True),
    (layers, "swiglu"): lambda g, up: jax.nn.silu(g) * up,
    (layers, "normalize"): _plain_normalize,
    (attention, "masked_softmax"): lambda s, m: jnp.where(m, jax.nn.softmax(jnp.where(m, s, -1e30), axis=-1), 0.0),
}


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
            vanilla = dataclasses.replace(looped, n_layers=args.layers * args.n, iterations=1, max_iterations=1,
                                          injection="none", iter_norm=False, post_norm=False,
                                          guidance="none")  # fmt: skip
            for name, cfg, n in (("looped", looped, args.n), ("vanilla", vanilla, 1)):
                with plain_autodiff():
                    old = step_fn(cfg, batch, n)  # traced and compiled here, with the plain expressions
                new = step_fn(cfg, batch, n)
                t_old, t_new = timed_pair(old, new, args.reps)
                print(f"| {name} | {mlp} | {remat} | {1e3 * t_old.wall_s:.1f} | {1e3 * t_new.wall_s:.1f} | "
                      f"{t_new.wall_s / t_old.wall_s:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
