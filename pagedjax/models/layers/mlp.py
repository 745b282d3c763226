"""The gated MLP block (SwiGLU): down(silu(x @ W_gate) * (x @ W_up)), gate and up fused in one matmul."""

from __future__ import annotations

import jax
from flax import nnx

from pagedjax.models.layers.linear import Linear, swiglu_mlp_input


class GatedMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, dtype, *, num_layers: int | None = None):
        self.gate_up_proj = Linear(dim, 2 * hidden, dtype, num_layers=num_layers, axes=("embed", "mlp"))
        self.down_proj = Linear(hidden, dim, dtype, num_layers=num_layers, axes=("mlp", "embed"))

    def __call__(
        self, x: jax.Array, layer: jax.Array | None = None, valid_rows: jax.Array | None = None
    ) -> jax.Array:
        w, idx = self.gate_up_proj.weight(layer)
        return self.down_proj(swiglu_mlp_input(x, w, idx, valid_rows), layer, valid_rows)
