"""The kernels' real lowerings, checked on a CPU: Triton for an abstract H100, Mosaic for an abstract TPU v5e.

Interpret mode (test_kernels.py) proves the math; this proves the same code gets through the lowering a
GPU or TPU run would use (no interpret fallback, no primitive Triton/Mosaic lacks, BlockSpecs legal for
each backend), for forward and backward, alone and inside the looped model's scan with remat. Compiling
and running the lowered kernels needs the chip (tests/test_kernels_hw.py, bench/RESULTS.md).
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import pytest
from asura.kernels import common as C
from asura.kernels import flash_gpu, flash_tpu
from asura.kernels import lowering as L
from flax import nnx

from asura.native import uninitialised

pytestmark = pytest.mark.skipif(not hasattr(jax.sharding, "AbstractDevice"), reason="needs jax>=0.12 for AOT targets")

# Ids avoid bare "gpu"/"tpu" (conftest treats those keywords as hardware markers).
TARGET_KERNEL = {"h100": (flash_gpu, "gpu"), "tpu-v5e": (flash_tpu, "tpu")}
KERNEL_NAMES = {"fwd", "dq", "dkdv"}


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _grad_fn(mod, seg: bool, causal: bool, **blocks):
    def f(q, k, v, *segs):
        def o(q, k, v):
            return mod.flash_attention(
                q, k, v, segment_ids_BT=segs[0] if seg else None, causal=causal, interpret=False, **blocks
            )

        return jax.grad(lambda q, k, v: o(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    return f


# (B, T, N, K, H, dtype, seg, causal)
CASES = [
    pytest.param(2, 1000, 8, 2, 128, jnp.bfloat16, True, True, id="h128-gqa-seg-bf16"),
    pytest.param(1, 4096, 16, 16, 64, jnp.bfloat16, False, True, id="h64-T4096-bf16"),
    pytest.param(1, 300, 4, 1, 256, jnp.bfloat16, False, False, id="h256-mqa-noncausal-bf16"),
    pytest.param(1, 130, 2, 2, 32, jnp.float32, True, True, id="h32-seg-f32"),
    pytest.param(1, 1, 2, 1, 64, jnp.float16, False, True, id="T1-f16"),
    pytest.param(1, 200, 3, 3, 48, jnp.bfloat16, True, False, id="h48-padded-head-bf16"),
]


@pytest.mark.parametrize("target", list(TARGET_KERNEL))
@pytest.mark.parametrize(("B", "T", "N", "K", "H", "dtype", "seg", "causal"), CASES)
def test_forward_and_backward_lower_to_kernels(target, B, T, N, K, H, dtype, seg, causal):
    mod, suffix = TARGET_KERNEL[target]
    if not mod.supports((B, T, N, H), (B, T, K, H), dtype)[0]:
        pytest.skip(f"{target} kernel does not take this shape: {mod.supports((B, T, N, H), (B, T, K, H), dtype)[1]}")
    args = [_sds((B, T, N, H), dtype), _sds((B, T, K, H), dtype), _sds((B, T, K, H), dtype)]
    if seg:
        args.append(_sds((B, T), jnp.int32))
    low = L.lower(_grad_fn(mod, seg, causal), *args, target_name=target)
    calls = L.kernel_calls(low, L.TARGETS[target][3])
    # One forward, one dq and one dk/dv kernel; nothing fell back to XLA attention or interpret mode.
    assert sorted(calls) == sorted(f"flash_{k}_{suffix}" for k in KERNEL_NAMES)
    assert "while" not in _outside_kernels(low.as_text())  # interpret mode would lower the grid to loops


def _outside_kernels(text: str) -> str:
    return re.sub(r"custom_call[^\n]*", "", text)


def test_triton_launch_uses_the_tuned_table():
    """Default tiles and warps from DEFAULT_BLOCKS reach the Triton launch (grid = cdiv(T, block_q))."""
    B, T, N, H = 2, 1000, 8, 128
    q = _sds((B, T, N, H), jnp.bfloat16)
    low = L.lower(_grad_fn(flash_gpu, False, True), q, q, q, target_name="h100")
    launches = {}
    for line in low.as_text().splitlines():
        if "xla.gpu.triton" in line:
            fields = dict(re.findall(r"(grid_[xyz]|num_warps|num_stages) = (\d+)", line))
            launches[re.search(r'name = "([^"]+)"', line).group(1)] = {k: int(v) for k, v in fields.items()}
    (bq, _, nw, ns), (bq_b, bk_b, nw_b, ns_b) = flash_gpu.DEFAULT_BLOCKS[H]["fwd"], flash_gpu.DEFAULT_BLOCKS[H]["bwd"]
    assert launches["flash_fwd_gpu"] == dict(grid_x=B, grid_y=N, grid_z=-(-T // bq), num_warps=nw, num_stages=ns)
    assert launches["flash_dq_gpu"] == dict(grid_x=B, grid_y=N, grid_z=-(-T // bq_b), num_warps=nw_b, num_stages=ns_b)
    assert launches["flash_dkdv_gpu"]["grid_z"] == -(-T // bk_b)


def test_target_platform_and_interpret_default():
    assert L.target_platform() == "cpu" and C.default_interpret(None) is True
    for name, (_, _, platform, _) in L.TARGETS.items():
        with L.target(name):
            assert L.target_platform() == platform
            assert C.default_interpret(None) is False
    assert L.target_platform() == "cpu"
    with pytest.raises(ValueError, match="unknown lowering target 'h900'; choose one of h100"), L.target("h900"):
        pass


MODEL = dict(
    vocab_size=256, d_model=256, n_heads=4, n_kv_heads=2, n_layers=2, iterations=3, max_iterations=4,
    injection="projconcat", iter_norm=True, guidance="linear", qk_norm=True, dtype="bfloat16",
)  # fmt: skip


@pytest.mark.parametrize("target", [*TARGET_KERNEL, None], ids=["h100", "tpu-v5e", "host-cpu"])
@pytest.mark.parametrize("remat", ["iteration", "none"])
def test_looped_model_train_step_lowers_with_kernels(target, remat):
    """attention=auto in the traced-depth looped model picks the target's Pallas kernel (XLA on the CPU host)."""
    from asura.config.schema import ModelConfig
    from asura.model import LoopedLM

    cfg = ModelConfig(**MODEL, remat=remat, attention="auto")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LoopedLM(cfg, rngs=nnx.Rngs(0))))
    B, T = 2, 512
    batch = {k: _sds((B, T), jnp.int32) for k in ("inputs", "targets", "segment_ids")}
    batch["loss_mask"] = _sds((B, T), jnp.float32)

    def step(state, batch, n):
        return jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=n)[0])(state)

    n = _sds((), jnp.int32)
    if target is None:
        text = jax.jit(step).trace(state, batch, n).lower().as_text()
        # XLA attention on the CPU, never interpret-mode kernels; the only custom call allowed is the
        # loop buffers' allocation (asura.native.uninitialised)
        assert set(re.findall(r"custom_call @([\w$]+)", text)) <= {uninitialised.TARGET}, text
        return
    suffix = TARGET_KERNEL[target][1]
    lowered = L.lower(step, state, batch, n, target_name=target)
    counts = collections.Counter(L.kernel_calls(lowered, L.TARGETS[target][3]))
    # The while driver's S-row buffers (residuals, carries) are allocated without a fill on the
    # accelerator, so rows of steps that never run cost nothing.
    assert "AllocateBuffer" in lowered.as_text()
    # The loop body holds one attention per layer; its backward adds dq + dkdv per layer, and remat
    # re-runs the forward inside the backward.
    L_ = cfg.n_layers
    fwd = L_ * (2 if remat != "none" else 1)
    assert counts == {f"flash_fwd_{suffix}": fwd, f"flash_dq_{suffix}": L_, f"flash_dkdv_{suffix}": L_}
