"""Typed, frozen config sections. Field comments are the documentation.

Every field has a default, so a YAML file only names what it changes. Allowed
values of a string field live in one place: the registry of the module that
implements it (``REGISTRIES``: attention, remat, adapters, depth schedules, data
sources), or ``CHOICES`` for plain enums. Cross-field rules live in
``asura.config.validate``. Nothing here imports JAX; validation reads the
registries (which import JAX, not Flax) before any compilation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what is valid."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # grouped-query attention; 0 = n_heads
    d_ff: int = 0  # MLP hidden width; 0 = 4*d_model (gelu) or 8/3*d_model rounded (swiglu)
    n_layers: int = 2  # blocks in the shared stack
    iterations: int = 3  # training depth (mean depth for sampled schedules)
    max_iterations: int = 3  # size of the per-iteration parameter axis
    extrapolation: str = "none"  # n > max_iterations: none (error) | last | cycle
    mlp: str = "gelu"  # gelu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    injection: str = "projconcat"  # projconcat | add | none
    loop_start: str = "embed"  # h_0, read by iteration 1: embed (h_0 = e) | zero (Fan et al. 2024; needs injection)
    iter_norm: bool = True  # per-iteration output norm h_t = LN_t(v)
    post_norm: bool = True  # per-iteration post-block norm PostLN[t]
    adapter: str = "none"  # registry: asura.model.adapter_registry
    adapter_rank: int = 4  # lora rank r, or ABBA r1
    adapter_rank2: int = 4  # ABBA r2 (ΔW rank <= r1*r2)
    adapter_gamma: float = 1.0  # scale of ΔW
    adapter_targets: tuple[str, ...] = ("q", "k", "v", "o", "up", "down")
    guidance: str = "none"  # none (final iteration only) | linear | uniform | explicit
    # Learned exit gate λ_t = σ(w·FinalNorm(h_t) + b) (Ouro, arXiv 2510.25741): trained with the expected
    # loss over each token's exit distribution p_t = λ_t·Π_{j<t}(1−λ_j) (the rest at depth n) minus
    # exit_entropy·H(p); halting's `gate` rule exits when Σ_{j<=t} p_j passes its threshold
    exit_gate: bool = False
    exit_entropy: float = 0.0  # β of the entropy bonus (needs exit_gate)
    # What trains the gate: expected (the loss above: Ouro's stage I) | improvement (Ouro's stage II,
    # with everything but the gate frozen, train.trainable=exit_gate): binary cross-entropy of λ_t
    # against the label "iteration t+1 was worth running", σ(k·(max(0, CE_t − CE_{t+1}) − γ)), from
    # each scored token's CE improvement (nats) over the next iteration
    exit_gate_loss: str = "expected"
    exit_gate_k: float = 50.0  # k: the label's slope (Ouro's value)
    exit_gate_gamma: float = 0.005  # γ: the improvement below which stopping is right (Ouro's value)
    guidance_weights: tuple[float, ...] = ()  # used when guidance=explicit; length max_iterations
    qk_norm: bool = True
    z_loss: float = 1e-4  # PaLM z-loss coefficient on logsumexp^2; 0 = off
    ce_chunk: int = 0  # vocabulary chunk for streaming cross-entropy; 0 = whole vocabulary
    tie_embeddings: bool = True
    position: str = "rope"  # rope | none (NoPE: the causal mask alone orders tokens; Fan et al. 2024 loop it)
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"
    attention: str = "auto"  # registry: asura.model.attention
    attn_block_q: int = 0  # Pallas block sizes; 0 = tuned default
    attn_block_k: int = 0
    remat: str = "iteration"  # registry: asura.model.remat (default: fastest measured, bench/skip_cost.py)
    loop: str = "while"  # depth loop: while (steps t >= n cost nothing) | scan (lax.scan over S, skips via switch)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * -(-(8 * self.d_model // 3) // 64)
        return 4 * self.d_model


@dataclass(frozen=True)
class DepthConfig:
    """Train-time depth schedule; each draw is a pure function of (seed, step)."""

    schedule: str = "fixed"  # registry: asura.depth.SCHEDULES
    min: int = 1  # uniform: lower bound
    max: int = 0  # upper bound for sampled depths; 0 = model.max_iterations
    sigma: float = 0.5  # poisson_lognormal: log-normal rate sigma (mean is model.iterations)
    bptt_k: int = 0  # truncated backprop through the last k iterations; 0 = all
    # Train under per-token halting (asura.model.halting): each token stops iterating when this exit
    # rule fires and is scored at its exit; "" = off. E.g. fine-tuning a gate model (train.init_from)
    # under its own exits with halt_kv=copy teaches it to read the copied keys/values that a
    # compute-saving decoder offers. The exit decisions are not differentiated: the gate's own loss
    # (model.exit_gate without halting) is what trains a gate; under halting its gradient is zero, so
    # only Adam's momentum moves it for a few dozen steps after halt_from (its inputs, the final norm's
    # output, still train). Under halting `ce` is each token's CE at its own exit.
    halt_rule: str = ""  # registry: asura.model.exits.EXIT_RULES
    halt_threshold: float = 0.0  # 0 = the rule's default threshold
    halt_kv: str = "copy"  # what others read from an exited token: copy | full (asura.model.halting)
    halt_from: int = 0  # the step from which training runs under halting; before it, the run's own loss
    # Under halting, train on the gate's own loss (model.exit_gate: expected CE over each token's exit
    # distribution, minus exit_entropy·H) computed on the halting forward instead of CE at the exit, so
    # the gate keeps learning where to stop while the model learns to read copied keys/values.
    halt_gate_loss: bool = False


@dataclass(frozen=True)
class DataConfig:
    source: str = "task"  # registry: asura.data.sources (task | text | synthetic on-device)
    task: str = "pointer_chase"  # see asura.data.tasks registry
    difficulty: int = 3  # task knob (hops, digits, length, ...)
    eval_difficulty: int = 0  # 0 = same as difficulty; raise it to test extrapolation
    # > 0: training draws each example's difficulty uniformly from min_difficulty..difficulty (eval
    # stays at eval_difficulty or difficulty): train on short problems, test on longer ones
    min_difficulty: int = 0
    held_out: float = 0.125  # task problems kept for eval only, by a hash of the problem (asura.data.tasks)
    path: str = ""  # text: ArrayRecord shard glob from `python -m asura.data.prepare`
    tokenizer: str = "byte"  # byte | path to tokenizers JSON | tiktoken:<encoding>
    seq_len: int = 64
    pack: bool = True  # first-fit packing of documents, with segment ids
    shuffle: bool = True
    num_epochs: int = 0  # 0 = repeat forever
    prefetch: int = 2
    worker_count: int = 0  # grain worker processes; 0 = in-process


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global batch, in sequences
    steps: int = 500  # optimiser steps
    seed: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    # Extending a finished run (train.py --extend): optimiser steps where the schedule changes.
    # hold_at: from this step the lr holds at the value the schedule reached there (the old cosine's
    # floor); rewarm_at: from this step warm up again to lr over warmup_steps, then cosine to the next
    # event or train.steps. Appended by --extend, inherited on resume, never rewritten (asura.train.optim).
    hold_at: tuple[int, ...] = ()
    rewarm_at: tuple[int, ...] = ()
    weight_decay: float = 0.1  # not applied to norms, biases or embeddings
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1  # microbatches per optimiser step
    # Fine-tuning: a run's workdir (its newest checkpoint) or workdir/checkpoints/<step> whose parameters
    # start this run (fresh optimiser, schedule and data order). The parameter shapes must match; read
    # only when this workdir has no checkpoint (a resume continues its own), and the run's config.yaml
    # names the step it took (asura.train.init_from).
    init_from: str = ""
    # Which parameters the optimiser updates (schema.TRAINABLE): all | exit_gate (only the gate's w and
    # b; the rest stays bit for bit, weight decay included: Ouro's stage II gate-only fine-tuning)
    trainable: str = "all"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    eval_depths: tuple[int, ...] = ()  # depth sweep at eval; () = 1..max_iterations
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    max_nan_steps: int = 5  # consecutive non-finite steps before aborting
    timing_skip_steps: int = 2  # compile/warm-up steps excluded from throughput
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "asura"


@dataclass(frozen=True)
class DcnConfig:
    """Mesh parallelism across slices (the data-center network), per mesh axis."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class MeshConfig:
    # Within a slice (ICI): -1 fills the slice's remaining devices. Without mesh.dcn, one level over
    # every device (a single slice, or several processes of one slice)
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Across slices (MaxText's dcn_*_parallelism): axis size = ICI size above x DCN size here, and the
    # DCN sizes multiply to the number of slices (TPU multislice: the devices' slice_index; elsewhere
    # one granule per process). DCN moves 1/128 (v5e) to 1/192 (v5p) of ICI's bytes per chip and
    # second (asura.chips): put data there, not fsdp or tensor, whose collectives run every layer
    dcn: DcnConfig = field(default_factory=DcnConfig)
    # Let one mesh axis take part of a physical torus axis (jax mesh_utils: fsdp=8 on a 4x4 slice);
    # false refuses such a mesh in one line. Never laid out in plain device order behind your back
    allow_split_physical_axes: bool = True
    # Logical axis -> mesh axes. Parameters and activations are annotated with
    # the logical names; this table is the only place that maps them to devices.
    rules: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "batch": ("data", "fsdp"),
            "embed": ("fsdp",),
            "vocab": ("tensor",),
            "heads": ("tensor",),
            "kv_heads": ("tensor",),
            "mlp": ("tensor",),
            "iteration": (),
            "seq": (),
            "head_dim": (),
            "rank": (),
        }
    )


@dataclass(frozen=True)
class Config:
    name: str = "asura"
    model: ModelConfig = field(default_factory=ModelConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


# train.trainable -> the top-level parameter names the optimiser updates (None: every parameter)
TRAINABLE: dict[str, tuple[str, ...] | None] = {"all": None, "exit_gate": ("w_gate", "b_gate")}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.extrapolation": ("none", "last", "cycle"),
    "model.loop": ("while", "scan"),
    "model.mlp": ("gelu", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.injection": ("projconcat", "add", "none"),
    "model.loop_start": ("embed", "zero"),
    "model.position": ("rope", "none"),
    "model.guidance": ("none", "linear", "uniform", "explicit"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "depth.halt_kv": ("copy", "full"),
    "model.exit_gate_loss": ("expected", "improvement"),
    "train.trainable": tuple(TRAINABLE),
    "model.param_dtype": ("float32", "bfloat16"),
}

# Config key -> "module:attribute" of the Registry listing its values (imported at validation).
REGISTRIES: dict[str, str] = {
    "model.attention": "asura.model.attention:IMPLS",
    "model.remat": "asura.model.remat:POLICIES",
    "model.adapter": "asura.model.adapter_registry:ADAPTERS",
    "depth.schedule": "asura.depth:SCHEDULES",
    "data.source": "asura.data.sources:SOURCES",
}


def registry(key: str):
    """The Registry of allowed values for a config key in REGISTRIES."""
    import importlib

    module, attr = REGISTRIES[key].split(":")
    return getattr(importlib.import_module(module), attr)


ADAPTER_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
LOGICAL_AXES = ("batch", "embed", "vocab", "heads", "kv_heads", "mlp", "iteration", "seq", "head_dim", "rank")
MESH_AXES = ("data", "fsdp", "tensor")
