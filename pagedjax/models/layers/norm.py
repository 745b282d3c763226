"""RMS norm, computed in float32 whatever the activation dtype (as Hugging Face Llama does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * (offset + weight); Gemma stores weight - 1 (offset 1)."""
    x = x.astype(jnp.float32)
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * (offset + weight.astype(jnp.float32))


class RMSNorm(nnx.Module):
    """RMS norm over the last axis; `num_layers` stacks one weight per layer (scanned layers)."""

    def __init__(self, dim: int, eps: float, *, num_layers: int | None = None, offset: float = 0.0):
        shape = (dim,) if num_layers is None else (num_layers, dim)
        axes = ("norm",) if num_layers is None else ("layers", "norm")
        self.scale = nnx.Param(jnp.ones(shape, jnp.float32), logical_axes=axes)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        w = self.scale.get_value()
        if layer is not None:
            w = lax.dynamic_index_in_dim(w, layer, keepdims=False)
        return rms_norm(x, w, self.eps, self.offset)
