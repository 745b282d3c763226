"""Rotary position embeddings (the "rotate half" convention of Hugging Face Llama).

Scalings: llama3, linear and Phi-3's LongRoPE; partial rotary (only the first part of each head
rotates); per-layer-type bases (Gemma 3's sliding layers use another theta). Frequencies are
computed once in numpy at trace time: they are constants of the compiled program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.config import ModelConfig


def inverse_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if kind == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, llama3, linear, longrope")


@dataclass(frozen=True, eq=False)
class RotaryEmbedding:
    """One RoPE variant: its frequencies and how cos/sin are scaled.

    LongRoPE (Phi-3) has two frequency sets: tokens at positions below `long_from` rotate with the
    short factors, later ones with the long factors. That is what Hugging Face's generate does with a
    KV cache (each token is rotated when it is processed, with the set its sequence length then
    selects); only a prompt prefilled past `long_from` in one pass differs (HF rotates all of it
    with the long set)."""

    inv_freq: np.ndarray  # f32 [rotary_dim / 2]
    attention_factor: float = 1.0  # cos and sin are multiplied by it (LongRoPE)
    long_inv_freq: np.ndarray | None = None
    long_from: int = 0

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos and sin of every token's rotation angles: f32 [T, 1, rotary_dim / 2] each.

        Compute them once per step and reuse them in every layer: inside the layer body XLA fuses
        them into the elementwise rotation and evaluates sin/cos again for every head element."""
        pos = positions.astype(jnp.float32)[:, None]
        angles = pos * jnp.asarray(self.inv_freq)[None, :]  # [T, Dr/2]
        if self.long_inv_freq is not None:
            long = pos * jnp.asarray(self.long_inv_freq)[None, :]
            angles = jnp.where(positions[:, None] >= self.long_from, long, angles)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos[:, None, :], sin[:, None, :]


def rotary_embedding(config: ModelConfig, theta: float, scaling: dict[str, Any] | None) -> RotaryEmbedding:
    rotary_dim = int(config.head_dim * config.partial_rotary_factor)
    if not scaling or scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return RotaryEmbedding(inverse_frequencies(rotary_dim, theta, scaling))
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)

    def scaled(factors):
        return (1.0 / (np.asarray(factors, np.float32) * base)).astype(np.float32)

    return RotaryEmbedding(
        scaled(scaling["short_factor"]), float(attention_factor), scaled(scaling["long_factor"]), original
    )


def rotary_embeddings(config: ModelConfig) -> dict[str, RotaryEmbedding]:
    """The model's RoPE variants by name: "global", and "local" when sliding layers have their own
    base (Gemma 3)."""
    out = {"global": rotary_embedding(config, config.rope_theta, config.rope_scaling_dict)}
    if config.sliding_rope_theta is not None:
        out["local"] = rotary_embedding(config, config.sliding_rope_theta, None)
    return out


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, heads, head_dim] (float32), cos/sin from `RotaryEmbedding.tables` -> rotated x.
    With partial rotary only the first 2 * cos.shape[-1] dims of each head rotate."""
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)
