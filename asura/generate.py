"""Generate text from a trained checkpoint at any depth, with a KV cache policy by name.

    python -m asura.generate --workdir runs/demo --depth 3 (--prompt "12+34=" | --question "12+34")
        [--step S|best|latest] [--cache per_iteration|shared_last|recompute] [--max-new-tokens K]
        [--max-length N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop TEXT ...]
        [--extrapolation last|cycle]

The completion goes to stdout; a one-line summary (step, depth, cache, tokens/s) to stderr.
--question takes a task checkpoint's question in plain form and formats it exactly as training
did (asura.data.tasks: Task.format_question; e.g. addition "5+7" -> "05+07=" at difficulty 2), and
stops at the newline that ends a task's answer (unless --stop says otherwise). --max-new-tokens
defaults to what fits in --max-length, at most 64.
--max-length N bounds prompt + new tokens; it defaults to the checkpoint's trained context
data.seq_len, since positions past it were never trained. Raised, the memory generation needs
(KV cache per --cache policy, activations, parameters: asura.infer.policies.generation_memory) is
checked against the device's before compiling. --temperature 0 (the default) is greedy.
--stop TEXT (repeatable; Python escapes such as \\n are read) ends the completion at a token that
TEXT encodes to. Depths past the checkpoint's max_iterations need --extrapolation (no retraining:
it only picks which per-iteration parameters the extra iterations reuse); no depth runs past
asura.depth.DEPTH_LIMIT. A prompt byte that is not UTF-8 reaches a byte model as that byte; output
bytes that are not UTF-8 print as \\xNN. Every bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import time

from asura.config.cli import OneLineParser, fail
from asura.infer.cli import add_model_flags, check_depth_limit, encode_text, load_model, positive, show, unescape
from asura.infer.policies import POLICIES

PROG = "python -m asura.generate"
DEFAULT_NEW_TOKENS = 64
GIB = 1 << 30


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Generate from a trained asura checkpoint.")
    add_model_flags(p)
    p.add_argument("--depth", type=int, required=True, help="loop iterations n (any depth; one compile)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue")
    what.add_argument("--question", help="a task checkpoint's question in plain form, e.g. 5+7 (formatted as trained)")
    p.add_argument("--cache", default="per_iteration", help=f"KV cache policy: {', '.join(POLICIES)}")
    p.add_argument(
        "--max-new-tokens", type=int, default=None,
        help=f"default: what fits in --max-length, at most {DEFAULT_NEW_TOKENS}",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=None, help="prompt + new tokens (default: data.seq_len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop at this one-token text (repeatable)")
    return p


def check_flags(args) -> None:
    """Everything the flags alone decide: before any loading."""
    if args.cache not in POLICIES:
        fail(POLICIES.invalid(args.cache), PROG)
    positive("--depth", args.depth, PROG)
    check_depth_limit("--depth", args.depth, PROG)
    if args.max_new_tokens is not None:
        positive("--max-new-tokens", args.max_new_tokens, PROG)
    if args.max_length is not None:
        if args.max_length < 2:
            fail(f"--max-length must be >= 2 (a prompt token and a new one), got {args.max_length}", PROG)
        if args.max_new_tokens is not None and args.max_new_tokens >= args.max_length:
            fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within --max-length "
                 f"{args.max_length} (a prompt has at least one token)", PROG)  # fmt: skip
    if not 0 <= args.seed < 2**31:
        fail(f"--seed must be in [0, 2^31), got {args.seed}", PROG)
    if args.prompt == "":
        fail("--prompt is empty; the model has no BOS token, so it needs at least one token to continue", PROG)


def prompt_text(args, cfg) -> str:
    """--prompt as given, or --question formatted by the checkpoint's task at its trained difficulty."""
    if args.question is None:
        return args.prompt
    if cfg.data.source != "task":
        fail(f"--question needs a task checkpoint, but this one trained on data.source={cfg.data.source}; "
             "give the text itself with --prompt", PROG)  # fmt: skip
    from asura.data.tasks import get_task

    try:
        return get_task(cfg.data.task).format_question(args.question, cfg.data.difficulty)
    except ValueError as e:
        fail(str(e), PROG)


def new_tokens(args, cfg, n_prompt: int) -> int:
    """--max-new-tokens, or by default what fits in --max-length (at most DEFAULT_NEW_TOKENS); refuses
    prompt + new tokens past --max-length (default: the trained context data.seq_len)."""
    max_length = args.max_length or cfg.data.seq_len
    if args.max_new_tokens is None:
        if n_prompt < max_length:
            return min(DEFAULT_NEW_TOKENS, max_length - n_prompt)
        where = f"--max-length {max_length}" if args.max_length else f"the trained context data.seq_len={max_length}"
        fail(f"the prompt ({n_prompt} tokens) leaves no room for a new token within {where}; shorten it, or allow "
             "more with --max-length N", PROG)  # fmt: skip
    total = n_prompt + args.max_new_tokens
    if total <= max_length:
        return args.max_new_tokens
    asked = f"the prompt ({n_prompt} tokens) + --max-new-tokens {args.max_new_tokens} is {total} tokens"
    if args.max_length is not None:
        fail(f"{asked}, past --max-length {args.max_length}", PROG)
    fail(f"{asked}, past the checkpoint's trained context data.seq_len={cfg.data.seq_len} (positions past it were "
         "never trained); ask for fewer, or allow more with --max-length N", PROG)  # fmt: skip


def check_memory(args, loaded, n_prompt: int) -> None:
    """Refuse a generation whose estimated peak memory exceeds the device's, before compiling."""
    import jax
    from flax import nnx

    from asura.infer.policies import generation_memory
    from asura.model.attention import resolve_impl
    from asura.train.preflight import device_memory_bytes

    model, m = loaded.model, loaded.cfg.model
    C = n_prompt if POLICIES[args.cache].cached else n_prompt + args.max_new_tokens  # the longest forward
    qk = [jax.ShapeDtypeStruct((1, C, heads, m.d_head), model.dtype) for heads in (m.n_heads, m.kv_heads)]
    need = generation_memory(
        m, args.cache, batch=1, prompt_len=n_prompt, max_new=args.max_new_tokens,
        scan_len=model.scan_len(args.depth, max(args.depth, m.max_iterations)),
        param_bytes=sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))), attention=resolve_impl(m.attention, *qk),
    )  # fmt: skip
    have = device_memory_bytes()
    if have is not None and need.total > have:
        fail(f"{n_prompt} prompt + {args.max_new_tokens} new tokens need about {need.total / GIB:.1f} GiB "
             f"(KV cache {need.cache / GIB:.1f} with --cache {args.cache}, activations {need.activations / GIB:.1f}, "
             f"parameters {need.params / GIB:.1f}) but the device has {have / GIB:.1f} GiB; lower --max-new-tokens "
             "or --max-length", PROG)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_flags(args)
    from asura.infer.sample import Sampling

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        fail(f"--{str(e).replace('_', '-')}", PROG)
    try:
        stops = [unescape(s) for s in args.stop]
    except UnicodeDecodeError as e:
        fail(f"--stop has a bad escape: {e.reason}", PROG)

    loaded = load_model(args, PROG, [args.depth])
    from asura.data.tokenizer import load_tokenizer
    from asura.infer import generate as infer_generate

    cfg = loaded.cfg
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except ValueError as e:
        fail(str(e), PROG)
    prompt = prompt_text(args, cfg)
    if args.question is not None and not stops:
        stops = ["\n"]  # a task example ends its answer with a newline: stop there, at the answer
    prompt_ids = encode_text(tok, prompt, "--question" if args.question is not None else "--prompt", PROG)
    stop_ids = [encode_text(tok, s, "--stop", PROG) for s in stops]
    V = cfg.model.vocab_size
    if max(prompt_ids, default=0) >= V:
        fail(f"the prompt encodes to token id {max(prompt_ids)}, past this model's vocab_size={V}", PROG)
    for text, ids in zip(stops, stop_ids, strict=True):
        if len(ids) != 1:
            fail(f"--stop {text!r} encodes to {len(ids)} tokens; it must be exactly one", PROG)
    args.max_new_tokens = new_tokens(args, cfg, len(prompt_ids))
    check_memory(args, loaded, len(prompt_ids))
    t0 = time.perf_counter()
    out = infer_generate.generate(
        loaded.model, [prompt_ids], args.depth, max_new_tokens=args.max_new_tokens, sampling=sampling,
        stop_tokens=[ids[0] for ids in stop_ids], seed=args.seed, cache=args.cache,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    new = out.tokens[0]
    print(show(tok, new[:-1] if out.stopped[0] else new))
    asked = f"; prompt {prompt!r} from --question" if args.question is not None else ""
    print(
        f"{PROG}: step {loaded.step}, depth {args.depth}, cache {args.cache}: {len(new)} tokens in {dt:.2f}s "
        f"(compile included){', stopped' if out.stopped[0] else ''}{asked}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
