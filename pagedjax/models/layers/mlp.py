"""The gated MLP block: down(act(x @ W_gate) * (x @ W_up)), gate and up fused in one matmul.

SwiGLU (act = SiLU: Llama, Qwen, Mistral, Phi-3, the MoE experts) or GeGLU (the tanh GELU: Gemma).
"""

from __future__ import annotations

import jax
from flax import nnx

from pagedjax.models.layers.linear import Linear, gated_mlp_input

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


class GatedMLP(nnx.Module):
    def __init__(
        self, dim: int, hidden: int, dtype, *, num_layers: int | None = None, activation: str = "silu"
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported MLP activation {activation!r}; supported: {ACTIVATIONS}")
        self.activation = activation
        self.gate_up_proj = Linear(dim, 2 * hidden, dtype, num_layers=num_layers, axes=("embed", "mlp"))
        self.down_proj = Linear(hidden, dim, dtype, num_layers=num_layers, axes=("mlp", "embed"))

    def __call__(
        self, x: jax.Array, layer: jax.Array | None = None, valid_rows: jax.Array | None = None
    ) -> jax.Array:
        w, idx = self.gate_up_proj.weight(layer)
        hidden = gated_mlp_input(x, w, idx, valid_rows, self.activation)
        return self.down_proj(hidden, layer, valid_rows)
