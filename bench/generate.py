"""Generation benchmark: tokens/s of cached vs uncached decoding and KV cache memory per policy, vs depth.

    python bench/generate.py                                 # demo-sized model (configs/demo.yaml), random init
    python bench/generate.py --depths 1,2,4,8 --batch 8 --prompt 32 --new 64 --reps 3
    python bench/generate.py --gap --workdir runs/demo       # shared_last vs exact, on a trained checkpoint

Speed: asura.infer.generate.generate end to end (prefill of --prompt tokens + --new decode steps, one
jitted program; the compile is excluded by a warm-up call), best of --reps, greedy, no stop token.
`recompute` is the uncached baseline: every new token reruns the full forward over the whole
[prompt + new] buffer. Memory: keys + values the policy keeps, R·L·B·T·K·H·2·bytes (R = S loop
steps for per_iteration, 1 for shared_last), T = prompt + new; S = max(depth, max_iterations).

Gap (--gap), two measurements on a trained checkpoint:
  1. teacher-forced on its eval batches: prefill one token, then decode every other position with the
     exact policy (per_iteration, = the forward) and with shared_last (the worst case: nothing but the
     first token is prefilled); the shared_last CE minus the exact CE on the scored tokens, top-1
     agreement with the exact argmax on them, the largest |logit difference| / the largest |logit|;
  2. task checkpoints: answer exact match of greedy generation from each eval example's prompt (the
     prompt prefilled, exact under both policies; the answer decoded), --examples of the eval stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from asura.infer.cache import CachedModel
from asura.infer.generate import generate
from asura.infer.policies import POLICIES

POLICY_ORDER = ("recompute", "per_iteration", "shared_last")


def demo_model(extrapolation: str = "last"):
    from flax import nnx

    from asura.config import load_config
    from asura.model import LoopedLM

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    mcfg = dataclasses.replace(cfg.model, extrapolation=extrapolation, attention="xla")
    return LoopedLM(mcfg, rngs=nnx.Rngs(0))


def speed(args) -> None:
    model = demo_model()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    T = args.prompt + args.new
    print(
        f"demo-sized model: d_model {cfg.d_model}, {cfg.n_layers} layer(s), {cfg.n_heads} heads ({cfg.kv_heads} kv), "
        f"max_iterations {cfg.max_iterations}; batch {args.batch}, prompt {args.prompt}, new {args.new}; "
        f"{jax.default_backend()}, jax {jax.__version__}"
    )
    head = f"{'depth':>5}  {'policy':<14} {'tok/s':>9}  {'speed-up':>8}  {'cache KiB':>9}"
    print(head)
    print("-" * len(head))
    for n in args.depths:
        base = None
        for name in POLICY_ORDER:
            kw = dict(max_new_tokens=args.new, cache=name, max_depth=max(n, cfg.max_iterations))
            generate(model, prompts, n, **kw)  # compile
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                generate(model, prompts, n, **kw)
                best = min(best, time.perf_counter() - t0)
            tps = args.batch * args.new / best
            base = base or tps
            S = max(n, cfg.max_iterations)
            kib = POLICIES[name].cache_bytes(
                S=S, layers=cfg.n_layers, batch=args.batch, length=T, kv_heads=cfg.kv_heads, head_dim=cfg.d_head,
                itemsize=jnp.dtype(model.dtype).itemsize,
            ) / 1024  # fmt: skip
            print(f"{n:>5}  {name:<14} {tps:9.0f}  {tps / base:7.1f}x  {kib:9.1f}")


def teacher_forced(cm: CachedModel, batch: dict, n: int, policy: str, max_depth: int) -> np.ndarray:
    """Logits [B, T, V]: prefill the first token of each row, then decode the rest one at a time."""
    tok, seg = batch["inputs"], batch["segment_ids"]
    B, T = tok.shape
    st = cm.prefill(cm.init(B, T, policy, max_depth), tok[:, :1], n, segment_ids_BT=seg[:, :1])
    out = [np.asarray(st.logits_BCV)]
    for i in range(1, T):
        st = cm.extend(st.cache, tok[:, i : i + 1], n, segment_ids_BC=seg[:, i : i + 1])
        out.append(np.asarray(st.logits_BCV))
    return np.concatenate(out, axis=1)


def gap(args) -> None:
    from asura.data import build_eval_batches
    from asura.io.load import load

    loaded = load(args.workdir, args.step, extrapolation="last")
    cm = CachedModel(loaded.model)
    batches = build_eval_batches(loaded.cfg, args.batches)
    top = max(args.depths)
    print(f"{loaded.workdir} step {loaded.step} (max_iterations {loaded.cfg.model.max_iterations}, extrapolation "
          f"last); {len(batches)} eval batch(es), teacher-forced, scored tokens only")  # fmt: skip
    head = f"{'depth':>5}  {'exact ce':>8}  {'shared_last ce':>14}  {'Δce':>8}  {'top-1 agree':>11}  "
    head += f"{'max|Δlogit|/max|logit|':>22}"
    print(head)
    print("-" * len(head))
    for n in args.depths:
        ce = {"per_iteration": [], "shared_last": []}
        agree, rel, toks = 0.0, 0.0, 0.0
        for b in batches:
            mask = b["loss_mask"] > 0
            lg = {p: teacher_forced(cm, b, n, p, top) for p in ce}
            for p, x in lg.items():
                logp = jax.nn.log_softmax(jnp.asarray(x), axis=-1)
                ce[p].append(-np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0][mask].sum())
            exact, approx = lg["per_iteration"][mask], lg["shared_last"][mask]
            agree += float((exact.argmax(-1) == approx.argmax(-1)).sum())
            rel = max(rel, float(np.abs(exact - approx).max() / np.abs(exact).max()))
            toks += float(mask.sum())
        e, s = sum(ce["per_iteration"]) / toks, sum(ce["shared_last"]) / toks
        print(f"{n:>5}  {e:8.4f}  {s:14.4f}  {s - e:+8.4f}  {agree / toks:11.4f}  {rel:22.4f}")
    if loaded.cfg.data.source == "task":
        answers_from_prompts(loaded, args)


def answers_from_prompts(loaded, args) -> None:
    from asura.data import tasks

    cfg = loaded.cfg
    examples = tasks.eval_examples(cfg.data.task, cfg.data.difficulty, cfg.train.seed, args.examples)
    prompts = [list(ex.prompt.encode()) for ex in examples]
    max_new = max(len(ex.answer) for ex in examples) + 1
    print(f"\ngreedy answers from {len(examples)} eval prompts ({cfg.data.task}, difficulty {cfg.data.difficulty}): "
          "exact match")  # fmt: skip
    print(f"{'depth':>5}  {'per_iteration':>13}  {'shared_last':>11}")
    for n in args.depths:
        em = {}
        for policy in ("per_iteration", "shared_last"):
            out = generate(loaded.model, prompts, n, max_new_tokens=max_new, stop_tokens=[ord("\n")], cache=policy,
                           max_depth=max(args.depths))  # fmt: skip
            right = [
                stop and bytes(t[:-1]).decode(errors="replace") == ex.answer
                for t, stop, ex in zip(out.tokens, out.stopped, examples, strict=True)
            ]
            em[policy] = float(np.mean(right))
        print(f"{n:>5}  {em['per_iteration']:13.3f}  {em['shared_last']:11.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="1,2,4,8", help="comma-separated depths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gap", action="store_true", help="measure shared_last against the exact cache (needs --workdir)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--step", default="latest")
    p.add_argument("--batches", type=int, default=1, help="eval batches for --gap")
    p.add_argument("--examples", type=int, default=256, help="task prompts for --gap's answer exact match")
    args = p.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    if args.gap:
        if args.workdir is None:
            p.error("--gap needs --workdir")
        gap(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
