"""The attention step of a decoder layer through the injected paged-attention backend.

Models never call a kernel directly: they hand q/k/v to `paged_attention`, which writes K/V into the
global page pool and attends through it with whatever backend the runner chose (`AttentionOps`).
"""

from __future__ import annotations

import jax

from pagedjax.models.step_inputs import AttentionOps, StepInputs


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    inputs: StepInputs,
    ops: AttentionOps,
    *,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [T, Hq, D], k/v [T, Hkv, D] (rotated) -> (attention output [T, Hq, D], k_cache, v_cache)."""
    if ops.fused is not None:  # the backend writes K/V inside its attention kernel
        return ops.fused(
            q,
            k_cache,
            v_cache,
            layer,
            inputs.attention,
            k,
            v,
            inputs.slot_pages,
            inputs.slot_offsets,
            scale=scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    k_cache, v_cache = ops.write_kv(k_cache, v_cache, layer, k, v, inputs.slot_pages, inputs.slot_offsets)
    out = ops.attention(
        q,
        k_cache,
        v_cache,
        layer,
        inputs.attention,
        scale=scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return out, k_cache, v_cache
