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
from pagedjax.models.layers.linear import linear, lm_head, split_layer_weights, swiglu_mlp_input
from pagedjax.models.layers.norm import rms_norm
from pagedjax.models.layers.rope import apply_rope, inverse_frequencies, rope_tables
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
    keep_rows: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run all layers over the step's tokens. Returns (hidden f32, k_cache, v_cache).

    The hidden states are [T, H], or [len(keep_rows), H] for just the rows `keep_rows` when given:
    then the last layer still writes every token's K/V but runs its output projection and MLP only
    for those rows (a prefill chunk needs the last layer's residual stream only at its last token:
    ~7% fewer matmul FLOPs per prompt token on a 12-layer model).

    `attention_fn` and `write_kv_fn` come from one attention backend (pallas_kernels.get_attention_backend
    / get_kv_writer); both have the signatures of the plain-XLA reference."""
    c = config
    inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling_dict)
    cos, sin = rope_tables(inputs.positions, inv_freq)  # once per step, shared by all layers
    scale = c.head_dim**-0.5
    T = inputs.token_ids.shape[0]
    h0 = params["embed"][inputs.token_ids].astype(jnp.float32)
    meta = inputs.attention

    sliced, whole = split_layer_weights(params["layers"])
    rows = inputs.valid_rows

    def attention_half(h, kc, vc, w, idx):
        """Norm, QKV, RoPE, K/V write and attention of every token: ([T, q_size], caches)."""
        x = rms_norm(h, w["attn_norm"], c.rms_norm_eps)
        qkv = linear(x, w["wqkv"], idx, rows)
        if "bqkv" in w:
            qkv = qkv + w["bqkv"]
        q, k, v = jnp.split(qkv, [c.q_size, c.q_size + c.kv_size], axis=-1)
        q = apply_rope(q.reshape(T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(T, c.num_kv_heads, c.head_dim), cos, sin)
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
        return attn.reshape(T, c.q_size), kc, vc

    def output_half(h, attn, w, idx, valid_rows):
        """Output projection + residual, then the MLP block + residual."""
        h = h + linear(attn, w["wo"], idx, valid_rows)
        x = rms_norm(h, w["mlp_norm"], c.rms_norm_eps)
        act = swiglu_mlp_input(x, w["w_gate_up"], idx, valid_rows)
        return h + linear(act, w["w_down"], idx, valid_rows)

    def weights(idx):
        return {**jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, idx, keepdims=False), sliced), **whole}

    def layer(carry, idx):
        h, kc, vc = carry
        w = weights(idx)
        attn, kc, vc = attention_half(h, kc, vc, w, idx)
        return (output_half(h, attn, w, idx, rows), kc, vc), None

    prune = keep_rows is not None and keep_rows.shape[0] < T
    scanned = c.num_layers - 1 if prune else c.num_layers
    layer_ids = jnp.arange(scanned, dtype=jnp.int32)
    (h, k_cache, v_cache), _ = lax.scan(layer, (h0, k_cache, v_cache), layer_ids)
    if prune:
        idx = jnp.int32(c.num_layers - 1)
        w = weights(idx)
        attn, k_cache, v_cache = attention_half(h, k_cache, v_cache, w, idx)
        h = output_half(h[keep_rows], attn[keep_rows], w, idx, None)
    elif keep_rows is not None:
        h = h[keep_rows]
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
    keep = None if all_logits else inputs.logits_indices
    h, k_cache, v_cache = forward_hidden(
        params, config, k_cache, v_cache, inputs, attention_fn, write_kv_fn, fused_attention_fn, keep
    )
    return compute_logits(params, config, h), k_cache, v_cache
