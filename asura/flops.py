"""Parameter and FLOP accounting for looped transformers: pure functions of the config.

Conventions (MaxText-style; see docs/method.md "Baselines and FLOPs"):

* A matmul against a weight matrix with P entries costs 2·P FLOPs per token. The embedding
  gather costs nothing; the unembedding [d, V] costs 2·d·V per application.
* Attention scores QKᵀ and the AV product each cost 2·T·N·H per token per block application
  for full attention; causal halves both, so causal attention adds 2·T·N·H (N heads of dim H).
  GQA does not change this: every query head still sees T keys.
* Norms, softmax, RoPE, activations, residual adds, additive injection and the loss are
  elementwise and not counted (they are O(d) or O(V) per token, not O(d²) or O(d·V)).
* Adapters are counted per token: LoRA r(m+n) weights touched -> 2·r·(m+n); ABBA through the
  Khatri–Rao identity -> 2·n·r1·r2 (x @ (A1ᵀ⊙A2ᵀ)) + 2·r1·r2·m (@ (B1⊙B2)ᵀ). Forming the
  Khatri–Rao factors costs r1·r2·(m+n) multiplies per iteration *per step*, not per token;
  it is left out of the per-token count (``khatri_rao_flops_per_step`` gives it).
* Latent guidance applies the head at every iteration that runs; otherwise it runs once. The exit
  gate's loss (``model.exit_gate``) scores every iteration too, and its gate w·x costs 2·d per
  token per iteration (counted with the head: ``score_flops``).
  ``fwd`` is the training forward (``LoopedLM.loss``); eval/generation logits use one head.
* Training = forward + backward. Forward FLOPs are 2N (N = weights touched); an iteration with
  gradients costs 6N (3× forward: backward computes input and weight gradients); an iteration
  before the last ``depth.bptt_k`` runs under stop_gradient and costs 2N (forward only). A
  guidance head on such an iteration is counted the same way (see ``head_multipliers``).
  Remat recompute is not counted.
* Sampled depth: every number is the expectation over the depth pmf ``depth_distribution``.

Parameter counts: ``unique`` counts the shared stack once plus every per-iteration slice
(all ``max_iterations``) plus embedding/head (tied counted once). ``total`` is the *effective
unrolled* count: the parameters an equivalent unrolled model would hold at the training depth
``model.iterations`` (stack and one per-iteration slice per iteration) — for a vanilla model
the two agree. ``trained`` is ``unique`` without the per-iteration slots that no training step
updates (``trained_slots``): slot t serves iteration t, and a depth schedule that never runs past
depth 3 leaves slot 4 of ``max_iterations: 4`` at its initial values (under truncated backprop, a
slot used only by frozen iterations gets no gradient either). Comparisons (the iso-param
baseline, its label) use ``trained``; ``untrained`` = ``unique`` - ``trained``.

CLI: ``python -m asura.flops --config FILE [key=value ...] [--json]`` prints the model next to
its derived baselines (``asura.baselines``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from asura.config.schema import Config, ModelConfig
from asura.depth import depth_distribution, expected_depth, grad_iterations
from asura.model.adapter_registry import ADAPTERS

__all__ = ["executed_flops", "expected_depth", "flop_count", "param_count", "summary"]


# ----------------------------------------------------------------- parameters


def _norm_params(m: ModelConfig, width: int) -> int:
    return 2 * width if m.norm == "layernorm" else width  # LayerNorm: scale + bias


_ATTN = ("q", "k", "v", "o")


def linear_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of every linear in one block, keyed by adapter target name."""
    d, nh, kh = m.d_model, m.n_heads * m.d_head, m.kv_heads * m.d_head
    shapes = {"q": (d, nh), "k": (d, kh), "v": (d, kh), "o": (nh, d), "up": (d, m.ff_dim), "down": (m.ff_dim, d)}
    if m.mlp == "swiglu":
        shapes["gate"] = (d, m.ff_dim)
    return shapes


def _targets(m: ModelConfig) -> list[tuple[int, int]]:
    shapes = linear_shapes(m)
    return [shapes[t] for t in m.adapter_targets if t in shapes] if m.adapter != "none" else []


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # [V, d]
    head: int  # [d, V]; 0 when tied to the embedding
    final_norm: int
    block: int  # one shared block (pre-norms, attention, MLP, qk-norm scales)
    stack: int  # n_layers shared blocks, counted once
    projection: int  # per-iteration extras, all max_iterations slices ...
    post_norm: int
    iter_norm: int
    adapters: int
    per_iteration: int  # ... and one slice of all of them
    unique: int  # what the optimiser holds
    total: int  # effective unrolled count at depth model.iterations
    trained: int  # unique minus the per-iteration slots no training step updates
    untrained: int  # unique - trained
    exit_gate: int = 0  # the learned exit gate (model.exit_gate), counted in the outer parameters


def param_count(cfg: Config) -> ParamCount:
    m = cfg.model
    d, V, M = m.d_model, m.vocab_size, m.max_iterations
    attn = sum(fi * fo for name, (fi, fo) in linear_shapes(m).items() if name in _ATTN)
    mlp = sum(fi * fo for name, (fi, fo) in linear_shapes(m).items() if name not in _ATTN)
    qk_norm = 2 * _norm_params(m, m.d_head) if m.qk_norm else 0
    block = 2 * _norm_params(m, d) + attn + mlp + qk_norm
    stack = m.n_layers * block
    proj_1 = 2 * d * d if m.injection == "projconcat" else 0
    post_1 = _norm_params(m, d) if m.post_norm else 0
    iter_1 = _norm_params(m, d) if m.iter_norm else 0
    adapt_1 = m.n_layers * sum(ADAPTERS[m.adapter].params(m, fi, fo) for fi, fo in _targets(m))
    per_iter = proj_1 + post_1 + iter_1 + adapt_1
    embedding, head = V * d, (0 if m.tie_embeddings else d * V)
    final_norm = _norm_params(m, d)
    gate = d + 1 if m.exit_gate else 0  # w [d] and b
    outer = embedding + head + final_norm + gate
    return ParamCount(
        embedding=embedding,
        head=head,
        final_norm=final_norm,
        block=block,
        stack=stack,
        projection=M * proj_1,
        post_norm=M * post_1,
        iter_norm=M * iter_1,
        adapters=M * adapt_1,
        per_iteration=per_iter,
        unique=outer + stack + M * per_iter,
        total=outer + m.iterations * (stack + per_iter),
        trained=outer + stack + len(trained_slots(cfg)) * per_iter,
        untrained=(M - len(trained_slots(cfg))) * per_iter,
        exit_gate=gate,
    )


def slot(m: ModelConfig, t: int) -> int:
    """The per-iteration parameter slot iteration t (0-based) reads: t, and past max_iterations
    the last slot (extrapolation=last) or t mod max_iterations (cycle)."""
    if t < m.max_iterations:
        return t
    return m.max_iterations - 1 if m.extrapolation == "last" else t % m.max_iterations


def trained_slots(cfg: Config) -> frozenset[int]:
    """Slots some training step updates: those of the iterations that carry gradients (the last
    bptt_k under truncated backprop) at every depth the schedule can draw."""
    k = cfg.depth.bptt_k
    return frozenset(
        slot(cfg.model, t)
        for n, p in depth_distribution(cfg).items()
        if p > 0
        for t in range(n - grad_iterations(n, k), n)
    )


# ---------------------------------------------------------------- FLOPs/token


def block_flops(m: ModelConfig, seq_len: int, causal: bool = True) -> int:
    """Forward FLOPs per token of one block application (adapters included)."""
    shapes = linear_shapes(m)
    dense = sum(2 * fi * fo for fi, fo in shapes.values())
    adapters = sum(ADAPTERS[m.adapter].flops(m, fi, fo) for fi, fo in _targets(m))
    scores_av = 2 * 2 * seq_len * m.n_heads * m.d_head  # QKᵀ and AV, full
    return dense + adapters + (scores_av // 2 if causal else scores_av)


def iteration_flops(m: ModelConfig, seq_len: int, causal: bool = True) -> int:
    """Forward FLOPs per token of one loop iteration: injection + the shared stack."""
    inject = 2 * 2 * m.d_model * m.d_model if m.injection == "projconcat" else 0
    return inject + m.n_layers * block_flops(m, seq_len, causal)


def score_flops(m: ModelConfig) -> int:
    """One scoring of an iteration: the head, and the exit gate (2·d) when the model has one."""
    return head_flops(m) + (2 * m.d_model if m.exit_gate else 0)


def scores_every_iteration(m: ModelConfig) -> bool:
    """Training scores every iteration: latent guidance, or the exit gate's expected loss."""
    return m.guidance != "none" or m.exit_gate


def head_flops(m: ModelConfig) -> int:
    return 2 * m.d_model * m.vocab_size


def head_multipliers(m: ModelConfig, n: int, bptt_k: int) -> tuple[int, int]:
    """(heads applied in the forward-only prefix, heads applied with gradients) at depth n.

    With guidance the head scores every iteration. Iterations before the last bptt_k run
    under stop_gradient *including their guidance loss term* (LoopedLM wraps the whole step,
    loss accumulator too), so their heads get no weight gradient either: forward-only (2N).
    """
    k = grad_iterations(n, bptt_k)
    if not scores_every_iteration(m):
        return 0, 1
    return n - k, k


def forward_flops(cfg: Config, n: int, causal: bool = True) -> int:
    """Forward FLOPs per token at depth n (all guidance heads included)."""
    m = cfg.model
    if scores_every_iteration(m):
        return n * (iteration_flops(m, cfg.data.seq_len, causal) + score_flops(m))
    return n * iteration_flops(m, cfg.data.seq_len, causal) + head_flops(m)


def executed_flops(
    cfg: Config, depth_pmf: dict[int, float], rule_head: bool = False, rule_gate: bool = False, causal: bool = True
) -> float:
    """Forward FLOPs per token when each token runs its own number of iterations (per-token halting,
    asura.model.halting): the expectation over the measured depth pmf {depth: fraction of tokens}.
    A token pays its iterations and one head; an exit rule that reads the output distribution
    (``rule_head``: kl, entropy, argmax) applies the head after every iteration the token runs, and
    the learned gate (``rule_gate``) its 2·d."""
    m = cfg.model
    it = iteration_flops(m, cfg.data.seq_len, causal) + (2 * m.d_model if rule_gate else 0)
    head = head_flops(m)
    per_depth = {d: d * (it + head) if rule_head else d * it + head for d in depth_pmf}
    return sum(p * per_depth[d] for d, p in depth_pmf.items())


def train_flops(cfg: Config, n: int, causal: bool = True) -> int:
    """Training FLOPs per token at depth n: 2N per forward-only iteration, 6N per gradient iteration."""
    m, k_cfg = cfg.model, cfg.depth.bptt_k
    k = grad_iterations(n, k_cfg)
    it = iteration_flops(m, cfg.data.seq_len, causal)
    heads_nograd, heads_grad = head_multipliers(m, n, k_cfg)
    # it and head_flops are forward FLOPs (2N); a forward-only pass costs 1x, forward+backward 3x (6N).
    head = score_flops(m) if scores_every_iteration(m) else head_flops(m)
    return (n - k) * it + 3 * k * it + (heads_nograd + 3 * heads_grad) * head


def khatri_rao_flops_per_step(cfg: Config, n: int) -> int:
    """ABBA's per-step (not per-token) cost of forming (A1ᵀ⊙A2ᵀ) and (B1⊙B2) at depth n."""
    m = cfg.model
    if m.adapter != "abba":
        return 0
    r12 = m.adapter_rank * m.adapter_rank2
    return n * m.n_layers * sum(r12 * (fi + fo) for fi, fo in _targets(m))


@dataclass(frozen=True)
class FlopCount:
    fwd: float  # expected forward FLOPs/token under the depth pmf
    train: float  # expected training FLOPs/token
    expected_depth: float
    pmf: dict[int, float]


def flop_count(cfg: Config, causal: bool = True) -> FlopCount:
    pmf = depth_distribution(cfg)
    return FlopCount(
        fwd=sum(p * forward_flops(cfg, n, causal) for n, p in pmf.items()),
        train=sum(p * train_flops(cfg, n, causal) for n, p in pmf.items()),
        expected_depth=sum(n * p for n, p in pmf.items()),
        pmf=pmf,
    )


def summary(cfg: Config) -> dict:
    """The numbers every run records: params, FLOPs/token, tokens, depth distribution."""
    pc, fc = param_count(cfg), flop_count(cfg)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return {
        "params_unique": pc.unique,
        "params_trained": pc.trained,
        "params_total": pc.total,
        "flops_per_token_fwd": fc.fwd,
        "flops_per_token_train": fc.train,
        "train_tokens": tokens,
        "train_flops": fc.train * tokens,
        "expected_depth": fc.expected_depth,
        "depth_pmf": {str(n): p for n, p in sorted(fc.pmf.items())},
        "params": dataclasses.asdict(pc),
    }


# ------------------------------------------------------------------------ CLI


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    units = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
    for scale, unit in units:
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _table(report: dict) -> str:
    model = report["model"]
    cols = (
        "params_unique",
        "params_trained",
        "params_total",
        "fwd/token",
        "train/token",
        "ratio",
        "run_flops",
        "check",
    )
    rows = []
    for name, r in report.items():
        if "impossible" in r:
            rows.append((name, *["-"] * 7, "impossible: " + r["impossible"]))
            continue
        ratio = r["flops_per_token_train"] / model["flops_per_token_train"]
        rows.append(
            (
                name,
                _fmt(r["params_unique"]),
                _fmt(r["params_trained"]),
                _fmt(r["params_total"]),
                _fmt(r["flops_per_token_fwd"]),
                _fmt(r["flops_per_token_train"]),
                f"{ratio:.3f}",
                _fmt(r["train_flops"]),
                r.get("check", f"E[n]={r['expected_depth']:.3g}"),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(("", *cols), *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(("", *cols), widths, strict=True)).rstrip()]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from asura.baselines import report
    from asura.config.cli import parse_config_args

    cfg, args = parse_config_args(
        argv,
        "python -m asura.flops",
        "Parameter/FLOP accounting of a config and its derived baselines.",
        lambda p: p.add_argument("--json", action="store_true", help="print one JSON object"),
    )
    rep = report(cfg)
    if args.json:
        print(json.dumps(rep, indent=1))
        return
    print(f"config: {cfg.name}  seq_len={cfg.data.seq_len}  E[n]={rep['model']['expected_depth']:.4g}")
    print(_table(rep))


if __name__ == "__main__":
    main()
