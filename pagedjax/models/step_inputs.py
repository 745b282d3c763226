"""What one engine step hands the model: the flat token batch and the attention backend's functions.

Shared by every architecture (and by the runner, which builds them), so no model file owns them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax

from pallas_kernels import AttentionMetadata, write_kv


@jax.tree_util.register_dataclass
@dataclass
class StepInputs:
    """Device arrays of one step (shapes fixed by the step's bucket)."""

    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    slot_pages: jax.Array  # i32[T]  page of each token's K/V slot (num_pages for padding)
    slot_offsets: jax.Array  # i32[T] offset inside that page
    logits_indices: jax.Array  # i32[S] rows whose logits are needed (padding: any valid row)
    attention: AttentionMetadata
    # Rows [v0, v1) and [v2, v3) hold real tokens (the step's decodes, then its packed prefill
    # tokens); the rest pad the bucket. Matmul kernels may skip padding rows. None: all rows.
    valid_rows: jax.Array | None = None  # i32[4]
    # The same for the `logits_indices` rows (speculative decoding pads them to a static count that
    # most steps do not fill): the last layer's pruned rows and the LM head may skip the rest.
    logits_valid_rows: jax.Array | None = None  # i32[4]


@dataclass(frozen=True)
class AttentionOps:
    """The injected paged-attention functions of one backend (pallas_kernels.get_attention_backend /
    get_kv_writer / get_fused_attention); all have the signatures of the plain-XLA reference.
    `fused` (or None) writes K/V inside the attention kernel: one call per layer instead of two."""

    attention: Callable
    write_kv: Callable = write_kv
    fused: Callable | None = None
