"""Generate text from a trained checkpoint at any depth, with a KV cache policy by name.

    python -m asura.generate --workdir runs/demo --depth 3 --prompt "12+34=" [--step S|best|latest]
        [--cache per_iteration|shared_last|recompute] [--max-new-tokens K] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--stop TEXT ...] [--extrapolation last|cycle]

The completion goes to stdout; a one-line summary (step, depth, cache, tokens/s) to stderr.
--temperature 0 (the default) is greedy. --stop TEXT (repeatable; Python escapes such as \\n
are read) ends the completion at a token that TEXT encodes to. Depths past the checkpoint's
max_iterations need --extrapolation (no retraining: it only picks which per-iteration
parameters the extra iterations reuse). Every bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import codecs
import sys
import time

from asura.config.cli import OneLineParser, fail
from asura.infer.cli import add_model_flags, load_model, positive
from asura.infer.policies import POLICIES

PROG = "python -m asura.generate"


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Generate from a trained asura checkpoint.")
    add_model_flags(p)
    p.add_argument("--depth", type=int, required=True, help="loop iterations n (any depth; one compile)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--cache", default="per_iteration", help=f"KV cache policy: {', '.join(POLICIES)}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop at this one-token text (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cache not in POLICIES:
        fail(POLICIES.invalid(args.cache), PROG)
    positive("--depth", args.depth, PROG)
    positive("--max-new-tokens", args.max_new_tokens, PROG)
    if not 0 <= args.seed < 2**31:
        fail(f"--seed must be in [0, 2^31), got {args.seed}", PROG)
    if not args.prompt:
        fail("--prompt is empty; the model has no BOS token, so it needs at least one token to continue", PROG)
    from asura.infer.sample import Sampling

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        fail(f"--{str(e).replace('_', '-')}", PROG)
    try:
        stops = [codecs.decode(s, "unicode_escape") for s in args.stop]
    except UnicodeDecodeError as e:
        fail(f"--stop has a bad escape: {e.reason}", PROG)

    loaded = load_model(args, PROG, [args.depth])
    from asura.data.tokenizer import load_tokenizer
    from asura.infer.generate import generate

    cfg = loaded.cfg
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except ValueError as e:
        fail(str(e), PROG)
    prompt_ids, *stop_ids = tok.encode_batch([args.prompt, *stops])
    V = cfg.model.vocab_size
    if max(prompt_ids, default=0) >= V:
        fail(f"the prompt encodes to token id {max(prompt_ids)}, past this model's vocab_size={V}", PROG)
    for text, ids in zip(stops, stop_ids, strict=True):
        if len(ids) != 1:
            fail(f"--stop {text!r} encodes to {len(ids)} tokens; it must be exactly one", PROG)
    t0 = time.perf_counter()
    out = generate(
        loaded.model, [prompt_ids], args.depth, max_new_tokens=args.max_new_tokens, sampling=sampling,
        stop_tokens=[ids[0] for ids in stop_ids], seed=args.seed, cache=args.cache,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    new = out.tokens[0]
    text = tok.decode(new[:-1] if out.stopped[0] else new)
    print(text)
    print(
        f"{PROG}: step {loaded.step}, depth {args.depth}, cache {args.cache}: {len(new)} tokens in {dt:.2f}s "
        f"(compile included){', stopped' if out.stopped[0] else ''}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
