"""What an attention backend needs to know about one engine step, as a pytree of arrays.

The step's query tokens are one flat array, laid out as

    [ decode tokens (one per decoding sequence, padded to D) | prefill tokens (padded to Tq) ]

Decode rows read their whole context from the page pool through `decode_block_tables`.
Prefill rows belong to up to `Sp` prefilling sequences; sequence `j` owns the contiguous query rows
`[prefill_q_start[j], prefill_q_start[j] + prefill_q_len[j])` (offsets inside the prefill part) and
its keys live in the pool pages of `prefill_block_tables[j]` (the current chunk is written before
attention runs, so the pool holds the whole context).

Padding rows have context length 0 / query length 0 and produce zeros. Every array has a static
shape fixed by the step's bucket, so XLA compiles one program per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    # Decode part: D rows.
    decode_block_tables: jax.Array  # i32[D, max_pages]
    decode_context_lens: jax.Array  # i32[D]   tokens in context, including this step's token
    # Prefill part: Sp sequences, Tq query rows.
    prefill_block_tables: jax.Array  # i32[Sp, max_pages]
    prefill_context_lens: jax.Array  # i32[Sp] tokens in context after this chunk is written
    prefill_q_start: jax.Array  # i32[Sp] first query row of the sequence in the prefill part
    prefill_q_len: jax.Array  # i32[Sp] query rows of the sequence (0 for padding)
    num_prefill_seqs: jax.Array  # i32[] real prefilling sequences this step

    @property
    def num_decode_rows(self) -> int:
        return self.decode_context_lens.shape[0]


def empty_metadata(num_decodes: int, num_prefill_seqs: int, max_pages: int) -> AttentionMetadata:
    """All-padding metadata of the given static shape (used by warm-up and tests)."""
    z = lambda *s: np.zeros(s, np.int32)
    return AttentionMetadata(
        decode_block_tables=z(num_decodes, max_pages),
        decode_context_lens=z(num_decodes),
        prefill_block_tables=z(num_prefill_seqs, max_pages),
        prefill_context_lens=z(num_prefill_seqs),
        prefill_q_start=z(num_prefill_seqs),
        prefill_q_len=z(num_prefill_seqs),
        num_prefill_seqs=np.int32(0),
    )
