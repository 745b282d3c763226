"""Token embedding, and its transpose as the LM head when the two are tied."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pagedjax.models.layers.linear import float32_precision


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, dtype):
        self.embedding = nnx.Param(jnp.zeros((vocab_size, dim), dtype), logical_axes=("vocab", "embed"))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """Rows of the table, as float32 (the residual stream's dtype)."""
        return self.embedding.get_value()[token_ids].astype(jnp.float32)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [T, H] @ table^T -> float32 logits [T, V] (tied LM head)."""
        table = self.embedding.get_value()
        return lax.dot_general(
            h.astype(table.dtype),
            table,
            (((1,), (1,)), ((), ())),
            precision=float32_precision(table.dtype),
            preferred_element_type=jnp.float32,
        )
