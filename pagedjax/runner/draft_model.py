"""A smaller draft model beside the target, for speculative decoding's `draft_model` method.

It keeps its own KV pool with the target's page numbering (same page count and block size), so the
target's block tables, prefix-cache pages, copy-on-write copies and preemptions apply to it as they
are: every step the draft runs over the same token batch as the target (`mirror`, its logits
unused), which keeps its K/V of every verified position current, and before a verification step it
drafts k tokens per speculating request in one jitted loop (`draft`). Costs: the draft's weights, a
second pool (the draft's share of KV bytes per token), one draft forward per step and k small
decode passes per speculative step.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.layers.linear import pack_params
from pagedjax.models.registry import get_forward, get_layer_skip_draft, get_model_class
from pagedjax.models.step_inputs import AttentionOps, StepInputs
from pagedjax.runner.kv_cache import allocate_kv_cache, copy_pages
from pallas_kernels import get_attention_backend, get_fused_attention, get_kv_writer


def jit_draft_loop(config: ModelConfig, ops: AttentionOps, page_size: int):
    """The architecture's draft loop (models/functional.make_layer_skip_draft) bound to a config,
    attention ops and page size, jitted with the page pool donated:
    step(params, k_cache, v_cache, tokens, positions, tables, num_drafts, *, num_layers, num_tokens)."""
    draft = get_layer_skip_draft(config)

    def step(params, k_cache, v_cache, tokens, positions, tables, num_drafts, num_layers, num_tokens):
        return draft(
            params,
            config,
            k_cache,
            v_cache,
            tokens,
            positions,
            tables,
            num_drafts,
            ops,
            num_layers=num_layers,
            num_tokens=num_tokens,
            page_size=page_size,
        )

    return jax.jit(step, static_argnames=("num_layers", "num_tokens"), donate_argnums=(1, 2))


def run_draft_loop(step, params, k_cache, v_cache, arrays, chunks: list, **static):
    """One call of a draft loop (`jit_draft_loop`) over a step's verification chunks, with the
    host arrays of `ModelRunner.draft_inputs`: -> (each chunk's drafts, k_cache, v_cache)."""
    drafts, k_cache, v_cache = step(params, k_cache, v_cache, *arrays, **static)
    host = np.asarray(drafts)
    return [host[r, : ch.num_spec_tokens].tolist() for r, ch in enumerate(chunks)], k_cache, v_cache


def warm_draft_loop(step, params, k_cache, v_cache, rows: int, max_pages: int, **static):
    """Compile a draft loop for `rows` rows with all-padding inputs (every K/V write is dropped)."""
    z = np.zeros(rows, np.int32)
    tables = np.zeros((rows, max_pages), np.int32)
    drafts, k_cache, v_cache = step(params, k_cache, v_cache, z, z, tables, z, **static)
    drafts.block_until_ready()
    return k_cache, v_cache


def delete_buffers(*trees) -> None:
    """Free the device buffers of `trees` now (the arrays become unusable)."""
    for x in jax.tree_util.tree_leaves(trees):
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


class DraftModel:
    def __init__(self, config: ModelConfig, params: dict, target) -> None:
        """`target`: the target's ModelRunner (pool geometry, backends, bucket shapes)."""
        self.config = config
        self.target = target
        swiglu = get_model_class(config).swiglu_kernels
        self.params = pack_params(params, swiglu) if target.matmul_backend == "cpu" else params
        self.k_cache, self.v_cache = allocate_kv_cache(
            config, target.num_pages, target.block_size, target.cache_dtype
        )
        shape = dict(head_dim=config.head_dim, page_size=target.block_size)
        backend = target.attention_backend
        ops = AttentionOps(
            get_attention_backend(backend, **shape),
            get_kv_writer(backend, **shape),
            get_fused_attention(backend, **shape),
        )
        forward = get_forward(config)

        def mirror_step(params, k_cache, v_cache, inputs: StepInputs):
            _, k_cache, v_cache = forward(
                params, config, k_cache, v_cache, inputs, ops.attention, False, ops.write_kv, ops.fused
            )
            return k_cache, v_cache

        self._mirror = jax.jit(mirror_step, donate_argnums=(1, 2))
        self._draft = partial(jit_draft_loop(config, ops, target.block_size), num_layers=config.num_layers)

    def mirror(self, inputs: StepInputs) -> None:
        """Run the draft over the target's step batch: its K/V for those positions, in its pool."""
        self.k_cache, self.v_cache = self._mirror(self.params, self.k_cache, self.v_cache, inputs)

    def copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.k_cache, self.v_cache = copy_pages(self.k_cache, self.v_cache, src, dst)

    def reallocate(self) -> None:
        self.k_cache, self.v_cache = allocate_kv_cache(
            self.config, self.target.num_pages, self.target.block_size, self.target.cache_dtype
        )

    def lost(self) -> bool:
        return self.k_cache.is_deleted() or self.v_cache.is_deleted()

    def draft(self, chunks: list, block_tables: dict[str, list[int]], num_tokens: int) -> list[list[int]]:
        """Greedy drafts of the draft model for this step's verification chunks."""
        arrays = self.target.draft_inputs(chunks, block_tables)
        drafts, self.k_cache, self.v_cache = run_draft_loop(
            self._draft, self.params, self.k_cache, self.v_cache, arrays, chunks, num_tokens=num_tokens
        )
        return drafts

    def warmup(self, shapes, num_tokens: int, max_rows: int) -> None:
        """Compile the mirror step for every bucket shape and the draft loop per row bucket."""
        for shape in shapes:
            self.mirror(self.target._example_inputs(shape))
        for rows in self.target.draft_row_buckets(max_rows):
            self.k_cache, self.v_cache = warm_draft_loop(
                self._draft,
                self.params,
                self.k_cache,
                self.v_cache,
                rows,
                self.target.max_pages_per_seq,
                num_tokens=num_tokens,
            )

    def release(self) -> None:
        """Free its weights and pool now (see `ModelRunner.release`)."""
        delete_buffers(self.k_cache, self.v_cache, self.params)
