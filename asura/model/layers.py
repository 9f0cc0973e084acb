"""Building blocks: parameter helper, norms, RoPE, adapted linear maps, attention, MLP.

Every parameter carries logical axis names (see LOGICAL_AXES in the config
schema) so `asura.parallel` can map it to a mesh. Per-iteration parameters have
a leading "iteration" axis of size max_iterations and are sliced by a (possibly
traced) slot index `t` at call time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from asura.compat import no_eager_sharding
from asura.config.schema import ModelConfig
from asura.kernels.lowering import target_platform
from asura.model.activations import gelu_tanh, normalize, swiglu
from asura.model.attention import attention
from asura.parallel.logical import constrain

# float64 is not a config choice; it exists for the finite-difference test.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def f32(dtype):
    """The dtype for norms, softmax and CE: at least fp32 (fp64 stays fp64)."""
    return jnp.promote_types(dtype, jnp.float32)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...], cfg: ModelConfig) -> nnx.Param:
    assert len(shape) == len(names), (shape, names)
    with no_eager_sharding():  # params carry sharding *metadata* only; placement is asura.parallel's job
        return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, DTYPES[cfg.param_dtype]))


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def dense(x: jax.Array, w_DF: jax.Array, out_dtype=None) -> jax.Array:
    """x[..., D] @ w[D, F]; on the CPU as one 2-D matmul over the flattened leading axes.

    Why 2-D on the CPU: with x [B, T, D] the weight gradient contracts two axes (batch, seq), and
    XLA:CPU lays it out by transposing the [B, T, F] cotangent into [F, B·T] (for the MLP
    up-projection that copy, fused with the GELU backward, was 31% of the CPU train step:
    bench/op_profile.py); contracting one axis needs no copy. Not on TPU/GPU, whose compilers
    contract the two axes natively: there the flattening only moved XLA's choices (the 350M
    preset compiled for v5p:2x2x2 at batch 128 peaked 1.38 GiB higher, bench/RESULTS.md).
    """
    if target_platform() != "cpu":
        return jnp.einsum("...d,df->...f", x, w_DF, preferred_element_type=out_dtype)
    *lead, d = x.shape
    y = jnp.matmul(x.reshape(-1, d), w_DF, preferred_element_type=out_dtype)
    return y.reshape(*lead, w_DF.shape[-1])


def take(p: nnx.Param, t) -> jax.Array:
    """Read a parameter; slice the leading iteration axis when t is given."""
    v = p[...]
    return v if t is None else v[t]


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, computed in fp32.

    `stack > 0` makes a per-iteration norm: parameters [stack, dim], sliced by t.
    """

    def __init__(self, cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs, stack: int = 0, name: str = "embed"):
        shape, names = ((stack, dim), ("iteration", name)) if stack else ((dim,), (name,))
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.scale = param(rngs, nnx.initializers.ones, shape, names, cfg)
        self.bias = None if self.rms else param(rngs, nnx.initializers.zeros, shape, names, cfg)

    def __call__(self, x: jax.Array, t=None) -> jax.Array:
        y = normalize(x.astype(f32(x.dtype)), not self.rms, self.eps)  # keeps x̂, 1/σ for the backward
        y = y * take(self.scale, t).astype(y.dtype)
        if self.bias is not None:
            y = y + take(self.bias, t).astype(y.dtype)
        return y.astype(x.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention, angles in fp32."""
    H = x_BTNH.shape[-1]
    half = H // 2
    dt = f32(x_BTNH.dtype)
    freq_F = theta ** (-jnp.arange(half, dtype=dt) / half)
    ang_BTF = positions_BT.astype(dt)[..., None] * freq_F
    cos_BT1F, sin_BT1F = jnp.cos(ang_BTF)[:, :, None], jnp.sin(ang_BTF)[:, :, None]
    x1, x2 = jnp.split(x_BTNH.astype(dt), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x_BTNH.dtype)


class Linear(nnx.Module):
    """y = x @ W (+ per-iteration adapter ΔW[t], never materialised). No bias."""

    def __init__(
        self,
        cfg: ModelConfig,
        d_in: int,
        d_out: int,
        names: tuple[str, str],
        *,
        rngs: nnx.Rngs,
        std: float,
        target: str = "",
    ):
        from asura.model.adapters import make_adapter  # adapters import `param` from here

        self.kernel = param(rngs, normal(std), (d_in, d_out), names, cfg)
        adapted = cfg.adapter != "none" and target in cfg.adapter_targets
        self.adapter = make_adapter(cfg, d_in, d_out, names, rngs=rngs) if adapted else None

    def __call__(self, x: jax.Array, t=None) -> jax.Array:
        y = dense(x, self.kernel[...].astype(x.dtype))
        if self.adapter is not None:
            y = y + self.adapter(x, t)
        return y


def out_std(cfg: ModelConfig) -> float:
    """Residual-branch output projections (attention o, MLP down) are scaled by
    1/sqrt(2 * n_layers * iterations): the residual stream receives 2 branch
    outputs per block per iteration, so the effective depth is L * n (GPT-2 rule)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers * cfg.iterations)


class QKV(NamedTuple):
    """One attention call's projections; k and v are what a KV cache keeps (asura.infer)."""

    q_BTNH: jax.Array
    k_BTKH: jax.Array  # after qk-norm and RoPE
    v_BTKH: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.cfg = cfg
        std = cfg.init_std
        self.q = Linear(cfg, D, N * H, ("embed", "heads"), rngs=rngs, std=std, target="q")
        self.k = Linear(cfg, D, K * H, ("embed", "kv_heads"), rngs=rngs, std=std, target="k")
        self.v = Linear(cfg, D, K * H, ("embed", "kv_heads"), rngs=rngs, std=std, target="v")
        self.o = Linear(cfg, N * H, D, ("heads", "embed"), rngs=rngs, std=out_std(cfg), target="o")
        self.q_norm = Norm(cfg, H, rngs=rngs, name="head_dim") if cfg.qk_norm else None
        self.k_norm = Norm(cfg, H, rngs=rngs, name="head_dim") if cfg.qk_norm else None

    def qkv(self, x_BTD: jax.Array, positions_BT, t=None) -> QKV:
        """Queries, keys and values of x after qk-norm and RoPE (none if model.position=none): what a KV
        cache stores (asura.infer)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.d_head
        # Keys and values come from the same normalised input as the queries.
        q_BTNH = self.q(x_BTD, t).reshape(B, T, N, H)
        k_BTKH = self.k(x_BTD, t).reshape(B, T, K, H)
        v_BTKH = self.v(x_BTD, t).reshape(B, T, K, H)
        if cfg.qk_norm:  # per-head norm before RoPE
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if cfg.position == "rope":
            q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = rope(k_BTKH, positions_BT, cfg.rope_theta)
        q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        return QKV(q_BTNH, k_BTKH, v_BTKH)

    def out(self, o_BTNH: jax.Array, t=None) -> jax.Array:
        """Output projection of the attended values [B, T, N, H] -> [B, T, D]."""
        B, T, N, H = o_BTNH.shape
        return self.o(o_BTNH.reshape(B, T, N * H), t)

    def __call__(self, x_BTD: jax.Array, positions_BT, segment_ids_BT, t=None) -> jax.Array:
        cfg = self.cfg
        p = self.qkv(x_BTD, positions_BT, t)
        o_BTNH = attention(
            p.q_BTNH,
            p.k_BTKH,
            p.v_BTKH,
            segment_ids_BT=segment_ids_BT,
            causal=True,
            impl=cfg.attention,
            block_q=cfg.attn_block_q,
            block_k=cfg.attn_block_k,
        )
        return self.out(o_BTNH, t)


class MLP(nnx.Module):
    """GeLU (tanh approximation, as GPT-2) or SwiGLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ff_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.up = Linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=cfg.init_std, target="up")
        self.gate = (
            Linear(cfg, D, F, ("embed", "mlp"), rngs=rngs, std=cfg.init_std, target="gate") if self.swiglu else None
        )
        self.down = Linear(cfg, F, D, ("mlp", "embed"), rngs=rngs, std=out_std(cfg), target="down")

    def __call__(self, x_BTD: jax.Array, t=None) -> jax.Array:
        up_BTF = self.up(x_BTD, t)
        # asura.model.activations: same values as jax.nn, fewer [B, T, F] residuals for the backward
        h_BTF = swiglu(self.gate(x_BTD, t), up_BTF) if self.swiglu else gelu_tanh(up_BTF)
        h_BTF = constrain(h_BTF, ("batch", "seq", "mlp"))
        return self.down(h_BTF, t)
