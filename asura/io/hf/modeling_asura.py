"""asura's looped transformer in PyTorch, for transformers with trust_remote_code=True (written by
`python -m asura.export` beside model.safetensors; the same math as asura.model.LoopedLM).

One weight-shared stack of blocks runs `depth` times:

    e = Embed(tokens);  h_0 = e (loop_start=embed) or 0 (zero)
    for t in 0 .. depth-1:   s = slot(t): t, or min(t, M-1) (extrapolation=last), t % M (cycle)
        x = inject(e, h): [e, h] @ W_inject[s] (projconcat) | h + e (add) | h (none)
        for each block: x = x + Attn(Norm(x); ΔW[s]), x = x + MLP(Norm(x); ΔW[s]); then PostNorm[s](x)
        h = IterNorm[s](x)
    logits = Norm(h) @ W_vocab   (fp32)

Adapters ΔW[s] (LoRA, ABBA) are applied as asura applies them, never materialised. Caching: one
DynamicCache entry per executed (iteration, layer), index t·L + i, so a cache serves one depth; the
depth is a forward/generate argument (`model.generate(ids, depth=6)`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_asura import AsuraConfig

EXTRAPOLATION = ("none", "last", "cycle")
# transformers renamed the cache argument and output field past_key_values -> cache (5.2x); both are read, and
# the output carries whichever field this version's CausalLMOutputWithPast has
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# asura's model.dtype: activations and matmul inputs (weights cast at use, whatever dtype they loaded in);
# norms, softmax and logits run in at least fp32, as in asura
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, in at least fp32 (asura.model.layers.Norm)."""

    def __init__(self, dim, config):
        super().__init__()
        self.rms, self.eps = config.norm == "rmsnorm", config.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        if not self.rms:
            y = y - y.mean(-1, keepdim=True)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * self.weight.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)


class LoRA(nn.Module):
    """ΔW = γ·B A (x @ ΔWᵀ = γ·(x Aᵀ) Bᵀ)."""

    def __init__(self, d_in, d_out, config):
        super().__init__()
        self.gamma = config.adapter_gamma
        self.lora_A = nn.Linear(d_in, config.adapter_rank, bias=False)
        self.lora_B = nn.Linear(config.adapter_rank, d_out, bias=False)

    def forward(self, x):
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return self.gamma * F.linear(F.linear(x, a), b)


class ABBA(nn.Module):
    """ΔW = γ·(B1 A1) ⊙ (B2 A2), applied through the Khatri–Rao product (rank r1·r2, never d_out × d_in)."""

    def __init__(self, d_in, d_out, config):
        super().__init__()
        self.gamma = config.adapter_gamma
        r1, r2 = config.adapter_rank, config.adapter_rank2
        self.A1, self.A2 = nn.Linear(d_in, r1, bias=False), nn.Linear(d_in, r2, bias=False)
        self.B1, self.B2 = nn.Linear(r1, d_out, bias=False), nn.Linear(r2, d_out, bias=False)

    def forward(self, x):
        a1, a2, b1, b2 = (m.weight.to(x.dtype) for m in (self.A1, self.A2, self.B1, self.B2))
        a_kr = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])  # [r1·r2, in]
        b_kr = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)  # [out, r1·r2]
        return self.gamma * F.linear(F.linear(x, a_kr), b_kr)


ADAPTERS = {"lora": LoRA, "abba": ABBA}


class Linear(nn.Module):
    """y = x Wᵀ (+ the adapter of iteration slot s). No bias."""

    def __init__(self, d_in, d_out, config, target):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        adapted = config.adapter != "none" and target in config.adapter_targets
        make = ADAPTERS.get(config.adapter)
        self.adapters = (
            nn.ModuleList([make(d_in, d_out, config) for _ in range(config.max_iterations)]) if adapted else None
        )

    def forward(self, x, s):
        y = F.linear(x, self.weight.to(x.dtype))
        return y if self.adapters is None else y + self.adapters[s](x)


def rope(x, positions, theta):
    """Rotary embedding, rotate-half, angles in fp32; x [B, heads, T, H], positions [B, T]."""
    half = x.shape[-1] // 2
    dt = torch.promote_types(x.dtype, torch.float32)
    freq = theta ** (-torch.arange(half, dtype=dt, device=x.device) / half)
    ang = positions.to(dt)[:, None, :, None] * freq
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x.to(dt).split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, self.N, self.K, self.H = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.config = config
        self.q_proj = Linear(D, self.N * self.H, config, "q")
        self.k_proj = Linear(D, self.K * self.H, config, "k")
        self.v_proj = Linear(D, self.K * self.H, config, "v")
        self.o_proj = Linear(self.N * self.H, D, config, "o")
        self.q_norm = Norm(self.H, config) if config.qk_norm else None
        self.k_norm = Norm(self.H, config) if config.qk_norm else None

    def forward(self, x, s, positions, mask, cache, cache_index):
        B, T, _ = x.shape
        q = self.q_proj(x, s).view(B, T, self.N, self.H)
        k = self.k_proj(x, s).view(B, T, self.K, self.H)
        v = self.v_proj(x, s).view(B, T, self.K, self.H)
        if self.q_norm is not None:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, heads, T, H]
        if self.config.position == "rope":
            q, k = rope(q, positions, self.config.rope_theta), rope(k, positions, self.config.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, cache_index)
        G = self.N // self.K  # query head n reads kv head n // G (asura's grouping)
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(self.H))
        # masked softmax: a row with no visible key (a padding query) attends to nothing, not NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1) * mask
        o = torch.matmul(p.to(v.dtype), v).to(x.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.N * self.H), s)


class MLP(nn.Module):
    """GeLU (tanh approximation) or SwiGLU."""

    def __init__(self, config):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.swiglu = config.mlp == "swiglu"
        self.up_proj = Linear(D, F_, config, "up")
        self.gate_proj = Linear(D, F_, config, "gate") if self.swiglu else None
        self.down_proj = Linear(F_, D, config, "down")

    def forward(self, x, s):
        up = self.up_proj(x, s)
        h = F.silu(self.gate_proj(x, s)) * up if self.swiglu else F.gelu(up, approximate="tanh")
        return self.down_proj(h, s)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size, config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.hidden_size, config)
        self.mlp = MLP(config)

    def forward(self, x, s, positions, mask, cache, cache_index):
        x = x + self.self_attn(self.input_layernorm(x), s, positions, mask, cache, cache_index)
        return x + self.mlp(self.post_attention_layernorm(x), s)


class AsuraPreTrainedModel(PreTrainedModel):
    config_class = AsuraConfig
    base_model_prefix = "model"
    _no_split_modules = ("Block",)

    def _init_weights(self, module):
        # Exported weights are always loaded; a fresh model starts like asura's (N(0, init_std) matrices)
        if isinstance(module, (nn.Linear, nn.Embedding, Linear)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, Norm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def slot(t, config, extrapolation):
    """The per-iteration parameter index of loop step t (asura.model.LoopedLM.slot)."""
    M = config.max_iterations
    if extrapolation == "last":
        return min(t, M - 1)
    if extrapolation == "cycle":
        return t % M
    return t


class AsuraModel(AsuraPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        D, M = config.hidden_size, config.max_iterations
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        proj = config.injection == "projconcat"
        self.inject = nn.ModuleList([nn.Linear(2 * D, D, bias=False) for _ in range(M)]) if proj else None
        self.post_norm = nn.ModuleList([Norm(D, config) for _ in range(M)]) if config.post_norm else None
        self.iter_norm = nn.ModuleList([Norm(D, config) for _ in range(M)]) if config.iter_norm else None
        self.norm = Norm(D, config)
        self.exit_gate = nn.Linear(D, 1) if config.exit_gate else None  # λ = σ(w·Norm(h) + b): asura's halting
        self.post_init()

    def check_depth(self, depth, extrapolation):
        if extrapolation not in EXTRAPOLATION:
            raise ValueError(f"extrapolation={extrapolation!r} is not valid; choose one of {', '.join(EXTRAPOLATION)}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if depth > self.config.max_iterations and extrapolation == "none":
            raise ValueError(
                f"depth {depth} is past max_iterations={self.config.max_iterations}: pass extrapolation='last' or "
                "'cycle' (which per-iteration parameters the extra iterations reuse)"
            )

    def forward(self, input_ids, positions, mask, cache=None, depth=None, extrapolation=None):
        """Final-normed latents [B, T, D] after `depth` iterations (and the raw latents before the norm)."""
        config = self.config
        depth = config.depth if depth is None else int(depth)
        extrapolation = config.extrapolation if extrapolation is None else extrapolation
        self.check_depth(depth, extrapolation)
        e = self.embed_tokens(input_ids).to(DTYPES[config.compute_dtype])  # asura: parameters cast to it at use
        h = torch.zeros_like(e) if config.loop_start == "zero" else e
        L = len(self.layers)
        for t in range(depth):
            s = slot(t, config, extrapolation)
            if config.injection == "projconcat":
                x = F.linear(torch.cat([e, h], dim=-1), self.inject[s].weight.to(e.dtype))
            elif config.injection == "add":
                x = h + e
            else:
                x = h
            for i, layer in enumerate(self.layers):
                x = layer(x, s, positions, mask, cache, t * L + i)
                if self.post_norm is not None:
                    x = self.post_norm[s](x)
            h = self.iter_norm[s](x) if self.iter_norm is not None else x
        return self.norm(h), h


class AsuraForCausalLM(AsuraPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = AsuraModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # generate() would size a DynamicCache by num_hidden_layers; a looped model caches depth × layers
        # entries, so forward makes its own (lazily growing) cache instead
        return False

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def vocab_weight(self):
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def exit_prob(self, normed):
        """λ = σ(w·Norm(h) + b) per token (asura's exit gate; model.exit_gate runs only)."""
        if self.model.exit_gate is None:
            raise ValueError("this model has no exit gate (asura model.exit_gate=false)")
        gate = self.model.exit_gate
        return torch.sigmoid(F.linear(normed.float(), gate.weight.float(), gate.bias.float()).squeeze(-1))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        depth=None,
        extrapolation=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        B, T = input_ids.shape
        cache = past_key_values if cache is None else cache
        if cache is None and use_cache:
            cache = DynamicCache()
        depth = self.config.depth if depth is None else int(depth)
        if cache is not None:
            mode = self.config.extrapolation if extrapolation is None else extrapolation
            held = getattr(cache, "asura_depth", None)
            if held is not None and held != (depth, mode):
                raise ValueError(
                    f"this cache was filled at depth {held[0]}, extrapolation {held[1]!r}; a cache serves one depth "
                    f"and mode, got depth {depth}, extrapolation {mode!r}"
                )
            needed = depth * self.config.num_hidden_layers
            if getattr(cache, "layer_class_to_replicate", True) is None and len(cache.layers) < needed:
                raise ValueError(
                    f"this cache holds {len(cache.layers)} layers; depth {depth} caches {needed} (iteration, layer) "
                    "entries: pass DynamicCache() without a config, or no cache"
                )
            cache.asura_depth = (depth, mode)
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
        if position_ids is None:  # left padding: positions count each row's real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        causal = torch.arange(S, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        normed, _ = self.model(input_ids, position_ids, mask, cache, depth, extrapolation)
        if logits_to_keep:
            normed = normed[:, -logits_to_keep:]
        # asura: the weight cast to the compute dtype, products accumulated and returned in fp32
        logits = F.linear(normed.float(), self.vocab_weight().to(normed.dtype).float())
        loss = None
        if labels is not None:  # Hugging Face's convention: predict labels shifted by one, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        depth=None,
        extrapolation=None,
        use_cache=True,
        cache=None,
        **kwargs,
    ):
        cache = past_key_values if cache is None else cache
        if cache is not None and cache.get_seq_length() > 0:  # the new tokens only: the rest is cached
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "past_key_values": cache,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            "depth": depth,
            "extrapolation": extrapolation,
        }
