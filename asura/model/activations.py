"""MLP activations whose linearisation keeps the derivative, not every intermediate.

Differentiated by autodiff, ``jax.nn.gelu(u, approximate=True)`` keeps four [B, T, F] intermediates
of its formula (u, 1 - tanh², u·cdf, ...) for the backward, and ``silu(g) · up`` keeps five. Under
remat ``none`` each one is a residual the while driver stores per executed step (an S-row buffer,
written in the forward and read back in the backward; asura.model.dynamic_loop), and any remat
policy holds them while a block's backward runs. Written as ``custom_jvp`` rules, the linearisation
keeps what the tangent map multiplies by: gelu'(u) (one array), and silu'(g)·up and silu(g) (two).

Forward values are jax.nn's own (the primal is the same expression). ``custom_jvp``, unlike
``custom_vjp``, keeps forward mode and higher derivatives working: the rules are plain jnp.
"""

from __future__ import annotations

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
