"""The Pallas kernels compiled for real hardware (interpret=False) vs the fp32 reference.

Each test runs once per accelerator kind: the Triton kernel on an NVIDIA GPU, the Mosaic kernel on a
TPU; the conftest skips the kinds that are absent (so all of this skips on a CPU). Same metric as
test_kernels.py; the reference runs with full-fp32 matmuls (XLA otherwise uses TF32 / bf16 passes
for fp32 dots, ~1e-3 relative error, which would hide or fake kernel errors). Shapes are realistic
enough to exercise the tuned default tiles, and T is never a block multiple, so the padding and the
causal diagonal blocks are both on the path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asura.kernels import flash_gpu, flash_tpu, reference
from flax import nnx
from test_kernels import TOL, make_inputs, rel_err, scan_remat_value_and_grads

# Ids "triton"/"mosaic"; the marks carry the hardware requirement.
HW = [
    pytest.param(flash_gpu, id="triton", marks=pytest.mark.gpu),
    pytest.param(flash_tpu, id="mosaic", marks=pytest.mark.tpu),
]


def _out_and_grads(fn, q, k, v, seg, do, causal):
    @jax.jit
    def run(q, k, v, seg, do):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids_BT=seg, causal=causal), q, k, v)
        return o, vjp(do.astype(o.dtype))

    return run(q, k, v, seg, do)


def _reference(q, k, v, seg, do, causal):
    with jax.default_matmul_precision("float32"):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return _out_and_grads(reference.attention, *f32, seg, do, causal)


# (B, T, N, K, H, causal, seg, dtype, block_q, block_k); None blocks = tuned defaults.
CASES = [
    pytest.param(2, 1000, 8, 2, 128, True, True, jnp.bfloat16, None, None, id="h128-gqa-seg-bf16-defaults"),
    pytest.param(2, 1000, 8, 8, 64, True, False, jnp.bfloat16, None, None, id="h64-mha-bf16-defaults"),
    pytest.param(1, 777, 4, 1, 128, False, False, jnp.bfloat16, None, None, id="h128-mqa-noncausal-bf16"),
    pytest.param(1, 300, 4, 2, 64, True, True, jnp.float32, None, None, id="h64-gqa-seg-f32"),
    pytest.param(1, 129, 2, 2, 32, True, False, jnp.float32, 32, 16, id="h32-bq>bk-f32"),
    pytest.param(1, 1, 2, 1, 64, True, False, jnp.bfloat16, None, None, id="T1-bf16"),
    pytest.param(1, 200, 2, 1, 48, True, True, jnp.bfloat16, 64, 32, id="h48-padded-head-bf16"),
]


@pytest.mark.parametrize("mod", HW)
@pytest.mark.parametrize(("B", "T", "N", "K", "H", "causal", "seg", "dtype", "bq", "bk"), CASES)
def test_compiled_values_and_grads_match_reference(mod, B, T, N, K, H, causal, seg, dtype, bq, bk):
    if not mod.supports((B, T, N, H), (B, T, K, H), dtype)[0]:
        pytest.skip(mod.supports((B, T, N, H), (B, T, K, H), dtype)[1])
    if mod is flash_tpu and bq is not None:
        bq, bk = 4 * bq, 4 * bk  # Mosaic tiles are multiples of 128 on the lane axis
    q, k, v, seg_BT, do = make_inputs(hash((B, T, N, K, H, causal, seg)) % 2**31, B, T, N, K, H, dtype, seg=seg)
    fn = functools.partial(mod.flash_attention, block_q=bq, block_k=bk, interpret=False)
    o, grads = _out_and_grads(fn, q, k, v, seg_BT, do, causal)
    o_ref, grads_ref = _reference(q, k, v, seg_BT, do, causal)
    assert o.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    assert rel_err(o, o_ref) < TOL[dtype]
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("mod", HW)
def test_compiled_inside_scan_remat_grad(mod):
    with jax.default_matmul_precision("float32"):
        kern = functools.partial(mod.flash_attention, interpret=False)
        (val, grads), (val_ref, grads_ref) = scan_remat_value_and_grads(kern, B=2, T=256, N=4, K=2, H=64, L=3)
    assert abs(float(val) - float(val_ref)) < 1e-4 * abs(float(val_ref)) + 1e-4
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("mod", HW)
def test_looped_model_pallas_matches_xla(mod):
    """The whole looped model (traced depth, remat, packed segments) with attention=pallas vs attention=xla."""
    del mod  # dispatch picks the backend's kernel; the parameter only carries the hardware mark
    from asura.config.schema import ModelConfig
    from asura.model import LoopedLM

    cfg = ModelConfig(
        vocab_size=64, d_model=128, n_heads=4, n_kv_heads=2, n_layers=1, iterations=3, max_iterations=3,
        injection="projconcat", iter_norm=True, guidance="linear", qk_norm=True, remat="iteration",
        attention="pallas",
    )  # fmt: skip
    B, T = 2, 192
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = {
        "inputs": jax.random.randint(k1, (B, T), 0, 64),
        "targets": jax.random.randint(k2, (B, T), 0, 64),
        "loss_mask": jnp.ones((B, T), jnp.float32),
        "segment_ids": jnp.repeat(jnp.arange(1, 4)[None], B, 0).repeat(T // 3, 1).astype(jnp.int32),
    }

    def loss_and_grads(impl):
        model = LoopedLM(dataclasses.replace(cfg, attention=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        @jax.jit
        def f(state, n):
            return jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch, n=n)[0])(state)

        return f(state, jnp.int32(3))

    with jax.default_matmul_precision("float32"):
        (val, grads), (val_ref, grads_ref) = loss_and_grads("pallas"), loss_and_grads("xla")
    np.testing.assert_allclose(float(val), float(val_ref), rtol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel_err(g, g_ref) < 1e-4
