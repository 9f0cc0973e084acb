"""Every selection and fallback path of asura.model.attention, on CPU by passing/monkeypatching the backend.

Param ids avoid bare "gpu"/"tpu": the conftest treats those keywords as hardware markers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from asura.kernels import flash_gpu, flash_tpu, reference

from asura.model import attention as A


def _inputs(T=20, N=4, K=2, H=32, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (1, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (1, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (1, T, K, H), jnp.float32).astype(dtype)
    return q, k, v


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _resolve(impl, H=64, dtype=jnp.bfloat16, backend="cpu", seg=False):
    q = jax.ShapeDtypeStruct((2, 16, 4, H), dtype)
    k = jax.ShapeDtypeStruct((2, 16, 2, H), dtype)
    seg_BT = jnp.zeros((2, 16), jnp.int32) if seg else None
    return A.resolve_impl(impl, q, k, segment_ids_BT=seg_BT, backend=backend)


def _mesh(monkeypatch, data=1, fsdp=1, tensor=1, **rules):
    from jax.sharding import AbstractMesh

    from asura.config.schema import MeshConfig
    from asura.parallel import logical

    mesh = AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))
    monkeypatch.setitem(logical._STATE, "mesh", mesh)
    monkeypatch.setitem(logical._STATE, "rules", {**MeshConfig().rules, **rules})


def test_pallas_under_a_mesh_needs_shardable_shapes(monkeypatch):
    """Under a multi-device mesh the kernel runs per shard; auto skips it only where shard_map can't split the call."""
    _mesh(monkeypatch, data=2, tensor=2)  # B=2 rows, 4 query / 2 kv heads: divisible
    assert _resolve("auto", backend="gpu") == "pallas"
    assert _resolve("auto", backend="tpu") == "pallas"
    ok, _, specs = A.shard_specs((2, 16, 4, 64), (2, 16, 2, 64))
    assert ok and tuple(specs[0]) == ("data", None, "tensor", None) and tuple(specs[2]) == ("data", None)
    _mesh(monkeypatch, data=2, tensor=4)  # 2 kv heads over 4 tensor shards
    assert _resolve("auto", backend="gpu") == "cudnn"
    assert _resolve("auto", backend="tpu") == "xla"
    with pytest.raises(ValueError, match="kv heads 2 not divisible by the 4 shards of mesh axes tensor"):
        _resolve("pallas", backend="gpu")
    _mesh(monkeypatch, data=4)  # batch 2 over 4 data shards
    assert "batch 2 not divisible" in A.shard_specs((2, 16, 4, 64), (2, 16, 2, 64))[1]
    _mesh(monkeypatch, data=2, tensor=2, seq=("tensor",), heads=(), kv_heads=())  # context parallel rules
    with pytest.raises(ValueError, match="needs seq and head_dim unsharded"):
        _resolve("pallas", backend="gpu")
    _mesh(monkeypatch, data=1)  # one device: no shard_map at all
    assert A.shard_specs((2, 16, 4, 64), (2, 16, 2, 64)) == (True, "ok", None)


@pytest.mark.parametrize(
    ("backend", "H", "dtype", "seg", "want"),
    [
        ("cpu", 64, jnp.bfloat16, False, "xla"),  # kernels would only run interpreted
        ("cpu", 64, jnp.float32, True, "xla"),
        ("gpu", 64, jnp.bfloat16, True, "pallas"),
        ("gpu", 128, jnp.float32, False, "pallas"),
        ("gpu", 512, jnp.bfloat16, False, "xla"),  # beyond both Pallas and cuDNN head-dim limits
        ("tpu", 128, jnp.bfloat16, True, "pallas"),
        ("tpu", 512, jnp.bfloat16, False, "xla"),
        ("tpu", 64, jnp.float16, False, "xla"),  # TPU kernel: fp32/bf16 only
    ],
)
def test_auto_resolution(backend, H, dtype, seg, want):
    assert _resolve("auto", H=H, dtype=dtype, backend=backend, seg=seg) == want


def test_auto_falls_back_to_cudnn_when_pallas_cannot(monkeypatch):
    monkeypatch.setattr(flash_gpu, "supports", lambda *a: (False, "pretend unsupported"))
    assert _resolve("auto", backend="gpu") == "cudnn"
    assert _resolve("auto", backend="gpu", seg=True) == "xla"  # cudnn refuses segment ids
    assert _resolve("auto", backend="gpu", dtype=jnp.float32) == "xla"  # cudnn needs bf16/fp16


@pytest.mark.parametrize(
    ("impl", "kw", "match"),
    [
        ("cudnn", dict(backend="cpu"), "cudnn needs a CUDA GPU"),
        ("cudnn", dict(backend="tpu"), "cudnn needs a CUDA GPU"),
        ("cudnn", dict(backend="gpu", dtype=jnp.float32), "bfloat16/float16"),
        ("cudnn", dict(backend="gpu", seg=True), "segment_ids"),
        ("cudnn", dict(backend="gpu", H=512), "head_dim"),
        ("cudnn", dict(backend="gpu", H=60), "head_dim"),
        ("pallas", dict(backend="gpu", H=512), "head_dim"),
        ("pallas", dict(backend="cpu", H=512), "head_dim"),
        ("pallas", dict(backend="tpu", dtype=jnp.float16), "float16"),
        ("pallas", dict(backend="metal"), "no Pallas kernel"),
        ("flash", dict(backend="gpu"), "not available"),
    ],
)
def test_explicit_impl_that_cannot_serve_raises(impl, kw, match):
    with pytest.raises(ValueError, match=match) as err:
        _resolve(impl, **kw)
    assert "auto" in str(err.value)  # names the valid choices


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"], ids=["on-cpu", "on-gpu", "on-tpu"])
def test_xla_always_supported(backend):
    assert A.supports("xla", (1, 8, 4, 1024), (1, 8, 4, 1024), jnp.float32, backend=backend) == (True, "ok")
    assert _resolve("xla", backend=backend) == "xla"


def test_explicit_cudnn_on_cpu_raises_at_call():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="cudnn needs a CUDA GPU"):
        A.attention(q, k, v, impl="cudnn")


def test_auto_on_cpu_runs_xla_under_jit():
    q, k, v = _inputs(dtype=jnp.float32)
    seg = jnp.array([[0] * 7 + [1] * 13], jnp.int32)
    o = jax.jit(lambda q, k, v: A.attention(q, k, v, segment_ids_BT=seg))(q, k, v)
    assert _rel(o, reference.attention(q, k, v, segment_ids_BT=seg)) < 1e-5


def test_explicit_pallas_on_cpu_runs_interpret_kernel():
    q, k, v = _inputs(dtype=jnp.float32)
    seg = jnp.array([[2] * 9 + [0] * 11], jnp.int32)
    o = A.attention(q, k, v, segment_ids_BT=seg, impl="pallas", block_q=16, block_k=16)
    assert _rel(o, A.xla_attention(q, k, v, segment_ids_BT=seg)) < 1e-5


@pytest.mark.parametrize(("backend", "module", "interpret"), [("gpu", flash_gpu, False), ("tpu", flash_tpu, False)])
def test_pallas_routes_to_backend_kernel(monkeypatch, backend, module, interpret):
    calls = []

    def fake(q, k, v, **kw):
        calls.append(kw)
        return q

    monkeypatch.setattr(A, "_backend", lambda: backend)
    monkeypatch.setattr(module, "flash_attention", fake)
    q, k, v = _inputs()
    A.attention(q, k, v, impl="pallas", block_q=64, block_k=0)
    assert calls == [dict(segment_ids_BT=None, causal=True, block_q=64, block_k=None, interpret=interpret)]


def test_cudnn_impl_rejects_segment_ids_directly():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="segment_ids"):
        A.cudnn_attention(q, k, v, segment_ids_BT=jnp.zeros((1, 20), jnp.int32))


def test_registry_lists_all_concrete_impls():
    assert set(A.available()) == {"xla", "cudnn", "pallas"}
    assert set(A.IMPLS.names) == {"auto", *A.available()}


# ---- real hardware (skipped on CPU by the conftest markers) ----


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_gpu_impls_match_xla(impl):
    q, k, v = _inputs(T=256, N=8, K=2, H=64)
    f = jax.jit(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(A.attention(q, k, v, impl=impl).astype(jnp.float32) ** 2), argnums=(0, 1, 2)
        )
    )
    g = jax.jit(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(reference.attention(*(x.astype(jnp.float32) for x in (q, k, v))) ** 2),
            argnums=(0, 1, 2),
        )
    )
    (val, grads), (val_ref, grads_ref) = f(q, k, v), g(q, k, v)
    assert abs(float(val) - float(val_ref)) < 2e-2 * abs(float(val_ref))
    for x, ref in zip(grads, grads_ref):
        assert _rel(x, ref) < 2e-2


@pytest.mark.gpu
def test_gpu_pallas_segments_match_reference():
    q, k, v = _inputs(T=200, N=4, K=4, H=128)
    seg = jnp.array([[1] * 70 + [2] * 100 + [0] * 30], jnp.int32)
    o = jax.jit(lambda q, k, v: A.attention(q, k, v, segment_ids_BT=seg, impl="pallas"))(q, k, v)
    ref = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids_BT=seg)
    assert _rel(o, ref) < 2e-2


@pytest.mark.tpu
def test_tpu_pallas_matches_reference():
    q, k, v = _inputs(T=512, N=4, K=2, H=128)
    seg = jnp.array([[1] * 300 + [2] * 212], jnp.int32)
    o = jax.jit(lambda q, k, v: A.attention(q, k, v, segment_ids_BT=seg, impl="pallas"))(q, k, v)
    ref = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids_BT=seg)
    assert _rel(o, ref) < 2e-2
