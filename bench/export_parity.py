"""Export parity on a trained run: the exported PyTorch model (transformers, trust_remote_code) against
asura, per depth. Needs the hf extra (torch, transformers).

    python bench/export_parity.py --workdir runs/demo [--depths 1-6] [--prompts 64] [--new-tokens 6]

For each depth (past max_iterations under extrapolation=last): the largest |logit difference| over
--prompts eval-style prompts' every position (fp32 both sides), and how many of the prompts' greedy
completions (KV-cached on both sides: asura's per_iteration policy, transformers' generate) are
token for token the same. Prompts are the run's held-out task problems (asura.data.tasks.eval_examples), or random bytes
for a text run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--depths", default="1-6")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=6)
    args = p.parse_args()
    lo, _, hi = args.depths.partition("-")
    depths = range(int(lo), int(hi or lo) + 1)

    import jax.numpy as jnp
    import torch
    import transformers

    from asura.infer.generate import generate
    from asura.io.export import export
    from asura.io.load import load

    loaded = load(args.workdir, extrapolation="last")
    cfg = loaded.cfg
    rng = np.random.default_rng(0)
    if cfg.data.source == "task":  # the run's held-out eval problems, as generation benchmarks prompt
        from asura.data.tasks import eval_examples

        difficulty = cfg.data.eval_difficulty or cfg.data.difficulty
        examples = eval_examples(cfg.data.task, difficulty, cfg.train.seed, args.prompts)
        prompts = [list(ex.prompt.encode()) for ex in examples]
    else:
        prompts = [list(rng.integers(32, 127, 12)) for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        done = export(args.workdir, f"{tmp}/exp")
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/exp", trust_remote_code=True).eval()
    print(f"{args.workdir} step {done.step}: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{len(prompts)} prompts, {args.new_tokens} new tokens, extrapolation=last past max_iterations "
          f"{cfg.model.max_iterations}\n")  # fmt: skip
    print("| depth | max abs logit diff | max abs logit | same greedy tokens | s |")
    print("|---|---|---|---|---|")
    L = max(len(x) for x in prompts)
    same_len = [x for x in prompts if len(x) == L]
    tok = np.asarray(same_len)
    for n in depths:
        t0 = time.time()
        ref = np.asarray(loaded.model(jnp.asarray(tok), n, max_depth=max(depths)))
        with torch.no_grad():
            got = hf(torch.as_tensor(tok), depth=n, extrapolation="last").logits.numpy()
        ours = generate(loaded.model, prompts, n, max_new_tokens=args.new_tokens, max_depth=max(depths)).tokens
        same = 0
        for prompt, mine in zip(prompts, ours, strict=True):
            ids = torch.as_tensor([prompt])
            theirs = hf.generate(ids, depth=n, extrapolation="last", max_new_tokens=args.new_tokens, do_sample=False)
            same += theirs[0, len(prompt) :].tolist() == mine
        print(f"| {n} | {np.abs(ref - got).max():.2e} | {np.abs(ref).max():.1f} | {same}/{len(prompts)} | "
              f"{time.time() - t0:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
