"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a pure function over a parameter pytree.

One call runs one engine step: a flat batch of tokens from many sequences (decodes and prefill
chunks together), writes their K/V into the global page pool, attends through the pool, and returns
logits only for the rows the sampler needs. Layers run under `lax.scan` over stacked weights: one
traced layer body, so compiles stay short however deep the model is.

Matmuls (models/layers/linear.py) accumulate in float32, through XLA's dot or, on CPU, a packed-weight
kernel; the residual stream, norms, RoPE and softmax stay in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from pagedjax.config import ModelConfig
from pagedjax.models.layers.linear import linear, lm_head, split_layer_weights
from pagedjax.models.layers.norm import rms_norm
from pagedjax.models.layers.rope import apply_rope, inverse_frequencies
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


def compute_logits(params: dict, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm + LM head (tied embeddings reuse the embedding matrix) -> float32 logits."""
    return lm_head(rms_norm(hidden, params["final_norm"], config.rms_norm_eps), params)


def forward_hidden(
    params: dict,
    config: ModelConfig,
    k_cache: jax.Array,
    v_cache: jax.Array,
    inputs: StepInputs,
    attention_fn: Callable,
    write_kv_fn: Callable = write_kv,
    fused_attention_fn: Callable | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run all layers over the step's tokens. Returns (hidden [T, H] f32, k_cache, v_cache).

    `attention_fn` and `write_kv_fn` come from one attention backend (pallas_kernels.get_attention_backend
    / get_kv_writer); both have the signatures of the plain-XLA reference."""
    c = config
    inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_dict)
    scale = c.head_dim**-0.5
    T = inputs.token_ids.shape[0]
    h0 = params["embed"][inputs.token_ids].astype(jnp.float32)
    meta = inputs.attention

    sliced, whole = split_layer_weights(params["layers"])
    rows = inputs.valid_rows

    def layer(carry, xs):
        h, kc, vc = carry
        w, idx = xs
        w = {**w, **whole}
        x = rms_norm(h, w["attn_norm"], c.rms_norm_eps)
        qkv = linear(x, w["wqkv"], idx, rows)
        if "bqkv" in w:
            qkv = qkv + w["bqkv"]
        q, k, v = jnp.split(qkv, [c.q_size, c.q_size + c.kv_size], axis=-1)
        q = apply_rope(q.reshape(T, c.num_heads, c.head_dim), inputs.positions, inv_freq)
        k = apply_rope(k.reshape(T, c.num_kv_heads, c.head_dim), inputs.positions, inv_freq)
        v = v.reshape(T, c.num_kv_heads, c.head_dim)
        if fused_attention_fn is not None:  # the backend writes K/V inside its attention kernel
            attn, kc, vc = fused_attention_fn(
                q,
                kc,
                vc,
                idx,
                meta,
                k,
                v,
                inputs.slot_pages,
                inputs.slot_offsets,
                scale=scale,
                sliding_window=c.sliding_window,
            )
        else:
            kc, vc = write_kv_fn(kc, vc, idx, k, v, inputs.slot_pages, inputs.slot_offsets)
            attn = attention_fn(q, kc, vc, idx, meta, scale=scale, sliding_window=c.sliding_window)
        h = h + linear(attn.reshape(T, c.q_size), w["wo"], idx, rows)
        x = rms_norm(h, w["mlp_norm"], c.rms_norm_eps)
        gate, up = jnp.split(linear(x, w["w_gate_up"], idx, rows), 2, axis=-1)
        h = h + linear(jax.nn.silu(gate) * up, w["w_down"], idx, rows)
        return (h, kc, vc), None

    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (h, k_cache, v_cache), _ = lax.scan(layer, (h0, k_cache, v_cache), (sliced, layer_ids))
    return h, k_cache, v_cache


def forward(
    params: dict,
    config: ModelConfig,
    k_cache: jax.Array,
    v_cache: jax.Array,
    inputs: StepInputs,
    attention_fn: Callable,
    all_logits: bool = False,
    write_kv_fn: Callable = write_kv,
    fused_attention_fn: Callable | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step: returns (logits f32[S, V] at `logits_indices` — or [T, V] if all_logits —, caches)."""
    h, k_cache, v_cache = forward_hidden(
        params, config, k_cache, v_cache, inputs, attention_fn, write_kv_fn, fused_attention_fn
    )
    rows = h if all_logits else h[inputs.logits_indices]
    return compute_logits(params, config, rows), k_cache, v_cache
