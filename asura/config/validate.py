"""Value and cross-field rules, checked before any JAX work.

Each rule raises ConfigError with one line naming the key, the bad value and
what is valid.
"""

from __future__ import annotations

import itertools

from asura.config.schema import (
    ADAPTER_TARGETS,
    CHOICES,
    LOGICAL_AXES,
    MESH_AXES,
    REGISTRIES,
    Config,
    ConfigError,
    ModelConfig,
    registry,
)
from asura.depth import DepthError, max_train_depth, scan_length


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _positive(cfg: Config, *keys: str, allow_zero: bool = False) -> None:
    for k in keys:
        v = _get(cfg, k)
        if v < 0 or (v == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{k} must be {need}, got {v}")


def _validate_halting(cfg: Config) -> None:
    """depth.halt_*: training under per-token halting (asura.model.halting.train_spec)."""
    m, d = cfg.model, cfg.depth
    if not d.halt_rule:
        for key, off in (("halt_threshold", 0.0), ("halt_from", 0), ("halt_kv", "copy"), ("halt_gate_loss", False)):
            if getattr(d, key) != off:
                raise ConfigError(f"depth.{key}={getattr(d, key)} is set but depth.halt_rule is empty (off)")
        return
    from asura.model.exits import EXIT_RULES

    if not 0 <= d.halt_from < cfg.train.steps:
        raise ConfigError(
            f"depth.halt_from={d.halt_from} must be in 0..train.steps-1={cfg.train.steps - 1} (the step training "
            "under halting starts)"
        )
    if d.halt_rule not in EXIT_RULES:
        names = ", ".join(EXIT_RULES.names)
        raise ConfigError(f'depth.halt_rule={d.halt_rule!r} is not valid; choose one of {names}, or "" for off')
    rule = EXIT_RULES[d.halt_rule]
    if d.halt_threshold < 0:
        raise ConfigError(f"depth.halt_threshold must be >= 0 (0 = the rule's default), got {d.halt_threshold}")
    if not d.halt_threshold and rule.default_threshold is None:
        raise ConfigError(f"exit rule {d.halt_rule!r} has no default threshold; set depth.halt_threshold")
    if rule.needs_gate and not m.exit_gate:
        raise ConfigError(f"depth.halt_rule={d.halt_rule} reads the learned exit gate: it needs model.exit_gate=true")
    if d.halt_gate_loss and not m.exit_gate:
        raise ConfigError("depth.halt_gate_loss trains the exit gate under halting: it needs model.exit_gate=true")
    if rule.needs_gate and not d.halt_from and not cfg.train.init_from and not d.halt_gate_loss:
        # its exits are not differentiated: an untrained gate (λ ≈ 1/2 everywhere) would fix the depths for good
        raise ConfigError(
            f"depth.halt_rule={d.halt_rule} reads a gate that only its own loss trains: set depth.halt_from > 0 "
            "(train it first), train.init_from (a run that trained it) or depth.halt_gate_loss=true"
        )
    if d.bptt_k:
        # truncation counts back from n, not from each token's exit: a token that exits at depth <= n - k
        # would send no gradient into the loop at all
        raise ConfigError(f"depth.bptt_k={d.bptt_k} does not combine with depth.halt_rule; set depth.bptt_k=0")
    # From depth.halt_from on, halting replaces the run's own loss; a setting of that loss only
    # makes sense when some steps (before halt_from) train with it.
    if m.guidance != "none" and not d.halt_from:
        raise ConfigError(
            f"training under halting scores each token at its exit; model.guidance={m.guidance} weights every "
            "iteration's loss: set model.guidance=none (or depth.halt_from > 0 to use it before halting)"
        )
    if m.exit_entropy and not d.halt_from and not d.halt_gate_loss:
        raise ConfigError(
            "model.exit_entropy regularises the gate's own loss, which training under halting (depth.halt_rule) "
            "replaces; set model.exit_entropy=0 (or depth.halt_from > 0 to train the gate first, or "
            "depth.halt_gate_loss=true)"
        )


def _validate_gate_training(cfg: Config) -> None:
    """The gate's two objectives (model.exit_gate_loss) and gate-only training (train.trainable)."""
    m, d, t = cfg.model, cfg.depth, cfg.train
    if m.exit_gate_loss == "expected":
        for key in ("exit_gate_k", "exit_gate_gamma"):
            if getattr(m, key) != getattr(ModelConfig, key):  # the dataclass default
                raise ConfigError(f"model.{key}={getattr(m, key)} is set but model.exit_gate_loss=expected ignores it")
    _positive(cfg, "model.exit_gate_k")
    _positive(cfg, "model.exit_gate_gamma", allow_zero=True)
    if m.exit_gate_loss == "improvement" or t.trainable == "exit_gate":
        key = "model.exit_gate_loss=improvement" if m.exit_gate_loss == "improvement" else "train.trainable=exit_gate"
        if not m.exit_gate:
            raise ConfigError(f"{key} trains the learned exit gate: it needs model.exit_gate=true")
        if d.halt_rule and not d.halt_gate_loss:
            # CE at each token's exit does not depend on the gate: it would get no gradient at all
            raise ConfigError(f"{key} trains the gate, which training under depth.halt_rule gives no gradient")
    if m.exit_gate_loss != "improvement":
        return
    if t.trainable != "exit_gate":
        # its objective has no CE term: trained with it, the rest of the model would only decay
        raise ConfigError(
            "model.exit_gate_loss=improvement trains the gate alone (Ouro's stage II): set train.trainable=exit_gate"
        )
    if m.exit_entropy:
        raise ConfigError("model.exit_entropy regularises the expected loss; model.exit_gate_loss=improvement has none")
    if d.halt_rule:
        raise ConfigError(
            "model.exit_gate_loss=improvement labels each exit from the full-depth forward; it does not combine "
            "with depth.halt_rule (use depth.halt_gate_loss with the expected loss)"
        )
    if m.iterations < 2:
        raise ConfigError(
            f"model.exit_gate_loss=improvement needs model.iterations >= 2 (got {m.iterations}): "
            "at depth 1 there is no exit to decide"
        )


def validate(cfg: Config) -> None:
    for key, valid in CHOICES.items():
        v = _get(cfg, key)
        if v not in valid:
            raise ConfigError(f"{key}={v!r} is not valid; choose one of {', '.join(valid)}")
    for key in REGISTRIES:
        reg = registry(key)
        if _get(cfg, key) not in reg:
            raise ConfigError(reg.invalid(_get(cfg, key)))

    m, d, t = cfg.model, cfg.depth, cfg.train
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        # the default workdir is runs/<name>: a name must be one path component
        raise ConfigError(f"name={cfg.name!r} must be a non-empty name without path separators (it names runs/<name>)")
    _positive(cfg, "model.vocab_size", "model.d_model", "model.n_heads", "model.n_layers")
    _positive(cfg, "model.iterations", "model.max_iterations", "model.norm_eps", "model.init_std")
    _positive(cfg, "model.rope_theta")
    _positive(cfg, "model.n_kv_heads", "model.d_ff", "model.z_loss", "model.ce_chunk", allow_zero=True)
    _positive(cfg, "model.attn_block_q", "model.attn_block_k", allow_zero=True)
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.d_head % 2:
        raise ConfigError(f"head dim d_model/n_heads={m.d_head} must be even for RoPE")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    if m.iterations > m.max_iterations and m.extrapolation == "none":
        raise ConfigError(
            f"model.iterations={m.iterations} exceeds model.max_iterations={m.max_iterations}; "
            "raise max_iterations or set model.extrapolation=last|cycle"
        )
    if m.loop_start == "zero" and m.injection == "none":
        # h_0 = 0 and nothing injected: no iteration would ever see the tokens
        raise ConfigError("model.loop_start=zero needs model.injection=add|projconcat (with none no iteration reads e)")
    _positive(cfg, "model.exit_entropy", allow_zero=True)
    if m.exit_gate and m.guidance != "none":
        raise ConfigError(
            f"model.exit_gate weights each iteration's loss by its exit probability; model.guidance={m.guidance} "
            "would weight them twice: set guidance=none"
        )
    if m.exit_entropy and not m.exit_gate:
        raise ConfigError("model.exit_entropy is set but model.exit_gate=false; it regularises the gate")
    _validate_gate_training(cfg)
    if m.adapter != "none":
        _positive(cfg, "model.adapter_rank", "model.adapter_rank2")
        if not m.adapter_targets:
            raise ConfigError(
                f"model.adapter={m.adapter} needs model.adapter_targets (any of {', '.join(ADAPTER_TARGETS)})"
            )
    for tgt in m.adapter_targets:
        if tgt not in ADAPTER_TARGETS:
            raise ConfigError(f"model.adapter_targets has {tgt!r}; valid targets: {', '.join(ADAPTER_TARGETS)}")
    if "gate" in m.adapter_targets and m.adapter != "none" and m.mlp != "swiglu":
        raise ConfigError("model.adapter_targets has 'gate' but model.mlp=gelu has no gate projection")
    if m.guidance == "explicit":
        w = m.guidance_weights
        if len(w) != m.max_iterations:
            raise ConfigError(
                f"model.guidance_weights has {len(w)} entries; guidance=explicit needs "
                f"max_iterations={m.max_iterations}"
            )
        if any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
            raise ConfigError(f"model.guidance_weights={list(w)} must be non-negative and sum to 1")
        if any(b < a for a, b in itertools.pairwise(w)):
            raise ConfigError(f"model.guidance_weights={list(w)} must be non-decreasing")
    elif m.guidance_weights:
        raise ConfigError(f"model.guidance_weights is set but model.guidance={m.guidance}; set guidance=explicit")
    if m.ce_chunk and m.vocab_size % m.ce_chunk:
        raise ConfigError(f"model.ce_chunk={m.ce_chunk} must divide model.vocab_size={m.vocab_size}")

    if d.max < 0 or d.min < 1:
        raise ConfigError(f"depth.min must be >= 1 and depth.max >= 0, got min={d.min} max={d.max}")
    top = max_train_depth(cfg)  # the same rule the schedules and the train step use
    try:
        scan_length(m, [top])
    except DepthError:
        raise ConfigError(
            f"the depth schedule reaches depth {top} (depth.max, or max(model.max_iterations, model.iterations) "
            f"when 0) > model.max_iterations={m.max_iterations}; lower depth.max or set model.extrapolation=last|cycle"
        ) from None
    if d.schedule == "uniform" and d.min > top:
        raise ConfigError(
            f"depth.min={d.min} exceeds the schedule's largest depth {top} (depth.max, or "
            "max(model.max_iterations, model.iterations) when depth.max=0)"
        )
    if d.schedule == "poisson_lognormal" and d.sigma <= 0:
        raise ConfigError(f"depth.sigma must be > 0, got {d.sigma}")
    if d.bptt_k < 0:
        raise ConfigError(f"depth.bptt_k must be >= 0 (0 = full backprop), got {d.bptt_k}")
    _validate_halting(cfg)

    _positive(cfg, "data.seq_len", "data.difficulty")
    _positive(cfg, "data.eval_difficulty", "data.num_epochs", "data.prefetch", "data.worker_count", allow_zero=True)
    _positive(cfg, "data.min_difficulty", allow_zero=True)
    if cfg.data.min_difficulty > cfg.data.difficulty:
        raise ConfigError(
            f"data.min_difficulty={cfg.data.min_difficulty} exceeds data.difficulty={cfg.data.difficulty} (the range's "
            "top); 0 trains at data.difficulty alone"
        )
    if cfg.data.source == "text" and not cfg.data.path:
        raise ConfigError("data.source=text needs data.path (an ArrayRecord glob from `python -m asura.data.prepare`)")

    _positive(cfg, "train.batch_size", "train.steps", "train.lr", "train.grad_accum", "train.log_every")
    _positive(cfg, "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nan_steps")
    _positive(cfg, "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.eval_batches", allow_zero=True)
    _positive(cfg, "train.timing_skip_steps", "train.seed", allow_zero=True)
    _positive(cfg, "train.eps")  # Adam divides by sqrt(nu) + eps: 0 gives 0/0 for a parameter with no gradient yet
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    events = [*t.hold_at, *t.rewarm_at]
    if any(e < 1 for e in events) or len(set(events)) != len(events):
        raise ConfigError(
            f"train.hold_at={list(t.hold_at)} and train.rewarm_at={list(t.rewarm_at)} must be distinct steps >= 1"
        )
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1):
        raise ConfigError(f"train.b1 and train.b2 must be in [0, 1), got {t.b1}, {t.b2}")
    try:
        scan_length(m, t.eval_depths)
    except DepthError as e:
        raise ConfigError(f"train.eval_depths={list(t.eval_depths)}: {e}") from None

    mesh = cfg.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {sizes}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k} must be a positive size or -1, got {v}")
    for k in MESH_AXES:
        if (v := getattr(mesh.dcn, k)) < 1:
            raise ConfigError(f"mesh.dcn.{k} must be a positive size (slices along {k}), got {v}")
    for logical, axes in mesh.rules.items():
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules has unknown logical axis {logical!r}; valid: {', '.join(LOGICAL_AXES)}")
        for ax in axes:
            if ax not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{logical} maps to unknown mesh axis {ax!r}; valid: {', '.join(MESH_AXES)}"
                )
