"""Nonlinearities whose linearisation keeps what the tangent map needs, not every intermediate.

Differentiated by autodiff, ``jax.nn.gelu(u, approximate=True)`` keeps four [B, T, F] intermediates
of its formula (u, 1 - tanh², u·cdf, ...) for the backward, ``silu(g) · up`` keeps five, a masked
``jax.nn.softmax`` keeps the masked scores, their exponentials and the masks besides the
probabilities (jax's own softmax rule is off by default: ``jax_softmax_custom_jvp``), and a
LayerNorm keeps x - mean besides the normalised x. Under remat ``none`` each one is a residual the
while driver stores per executed step (an S-row buffer, written in the forward and read back in the
backward; asura.model.dynamic_loop), and any remat policy holds them while a block's backward runs.
Written as ``custom_jvp`` rules, the linearisation keeps only what the tangent map multiplies by:

gelu_tanh       gelu'(u)                              (1 array; was 4)
swiglu          silu'(g)·up, silu(g)                  (2; was 5)
masked_softmax  the probabilities p                   (1 [.., T, S] array; was 3 and 2 boolean masks)
normalize       x̂ and 1/σ ([.., 1])                   (was x - mean, x̂ and two [.., 1])

Forward values are the same expressions as before (tests/test_model_activations.py checks them bit
for bit). ``custom_jvp``, unlike ``custom_vjp``, keeps forward mode and higher derivatives working:
the rules are plain jnp.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

_GELU_CUBIC = 0.044715  # jax.nn.gelu's tanh approximation


@jax.custom_jvp
def gelu_tanh(u: jax.Array) -> jax.Array:
    """jax.nn.gelu(u, approximate=True) (GPT-2's GeLU)."""
    return jax.nn.gelu(u, approximate=True)


def gelu_tanh_grad(u: jax.Array) -> jax.Array:
    """d gelu_tanh / du, in u's dtype, in the order of jax.nn.gelu's own autodiff."""
    u = jnp.asarray(u)  # forward mode hands a Python scalar through unchanged
    c = np.sqrt(2 / np.pi).astype(u.dtype)
    t = jnp.tanh(c * (u + _GELU_CUBIC * u**3))
    return 0.5 * (1 + t) + u * (0.5 * (1 - t * t) * c * (1 + 3 * _GELU_CUBIC * u**2))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    return gelu_tanh(u), gelu_tanh_grad(u) * du


@jax.custom_jvp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up (the SwiGLU MLP's hidden activation)."""
    return jax.nn.silu(gate) * up


@swiglu.defjvp
def _swiglu_jvp(primals, tangents):
    (gate, up), (d_gate, d_up) = primals, tangents
    s = jax.nn.sigmoid(gate)
    silu = gate * s
    # grouped so the linearisation keeps two arrays: (silu'·up) and silu
    return silu * up, (s * (1 + gate * (1 - s)) * up) * d_gate + silu * d_up


@jax.custom_jvp
def masked_softmax(s: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis where ``mask`` (broadcast against s), 0 elsewhere; a row with no
    visible entry gives zeros, not NaN."""
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.where(mask, p, 0.0)


@masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    (s, mask), (ds, _) = primals, tangents  # the mask is boolean: no tangent
    p = masked_softmax(s, mask)
    # p is 0 where masked, so finite masked entries of ds neither move p nor get a gradient (a NaN
    # there reaches the row, which the old `where` blocked; the forward p @ v is NaN then anyway)
    return p, p * (ds - (p * ds).sum(-1, keepdims=True))


def _centred_and_inv_std(x: jax.Array, centre: bool, eps: float) -> tuple[jax.Array, jax.Array]:
    """(x - mean if centre else x, 1/sqrt(mean square of that + eps)) over the last axis."""
    if centre:
        x = x - x.mean(-1, keepdims=True)
    return x, jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def normalize(x: jax.Array, centre: bool, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis (LayerNorm; RMSNorm without ``centre``)."""
    c, r = _centred_and_inv_std(x, centre, eps)
    return c * r


@normalize.defjvp
def _normalize_jvp(centre, eps, primals, tangents):
    (x,), (dx,) = primals, tangents
    c, r = _centred_and_inv_std(x, centre, eps)
    x_hat = c * r
    if centre:
        dx = dx - dx.mean(-1, keepdims=True)
    # d x̂ = r·(dc - x̂·mean(x̂·dc)); x̂ and r are all it keeps
    return x_hat, r * (dx - x_hat * (x_hat * dx).mean(-1, keepdims=True))
