"""Gemma 2: the Llama decoder with Gemma's quirks.

- RMSNorm weights are stored minus one (the norm multiplies by 1 + w);
- the embedding is scaled by sqrt(hidden_size) (rounded to the weights' dtype, as HF does);
- each block has a norm before *and* after it: post-attention and post-MLP norms before the
  residual adds;
- the gated MLP is GeGLU (tanh GELU);
- attention scores are scaled by query_pre_attn_scalar ** -0.5 and soft-capped
  (cap * tanh(s / cap)) and so are the final logits;
- layers alternate sliding-window and global attention (`ModelConfig.layer_types`; the Llama
  module scans over the pattern's period, see `pattern_period`).
The embeddings are tied.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.layers.norm import RMSNorm
from pagedjax.models.llama import LlamaDecoderLayers, LlamaForCausalLM
from pagedjax.models.params import hf_tensor

GEMMA_NORM_OFFSET = 1.0


class Gemma2DecoderLayers(LlamaDecoderLayers):
    norm_offset = GEMMA_NORM_OFFSET

    def __init__(self, config: ModelConfig, dtype):
        super().__init__(config, dtype)
        c, L = config, config.num_layers
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, num_layers=L, offset=self.norm_offset)
        self.post_mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, num_layers=L, offset=self.norm_offset)

    def output_half(self, h, attn, layer, valid_rows):
        h = h + self.post_attn_norm(self.o_proj(attn, layer, valid_rows), layer)
        out = self.mlp(self.mlp_norm(h, layer), layer, valid_rows)
        return h + self.post_mlp_norm(out, layer)


class Gemma2ForCausalLM(LlamaForCausalLM):
    decoder_layers = Gemma2DecoderLayers
    swiglu_kernels = ()  # GeGLU: the AMX kernel's fused SiLU does not apply

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        table = self.embed.embedding.get_value()
        normalizer = jnp.asarray(self.config.hidden_size**0.5, table.dtype).astype(jnp.float32)
        return self.embed(token_ids) * normalizer

    @classmethod
    def layer_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        out = super().layer_tensors(tensors, config, i)
        p = f"model.layers.{i}."
        out["mlp_norm"] = {"scale": hf_tensor(tensors, p + "pre_feedforward_layernorm.weight")}
        out["post_attn_norm"] = {"scale": hf_tensor(tensors, p + "post_attention_layernorm.weight")}
        out["post_mlp_norm"] = {"scale": hf_tensor(tensors, p + "post_feedforward_layernorm.weight")}
        return out
