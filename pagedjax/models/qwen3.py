"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head's q and k before RoPE, and no
QKV bias (Qwen2 has one). Everything else — GQA, SwiGLU, tied or untied head — is Llama's."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.layers.norm import RMSNorm
from pagedjax.models.layers.rope import apply_rope
from pagedjax.models.llama import LlamaDecoderLayers, LlamaForCausalLM
from pagedjax.models.params import hf_tensor


class Qwen3DecoderLayers(LlamaDecoderLayers):
    def __init__(self, config: ModelConfig, dtype):
        super().__init__(config, dtype)
        c = config
        L, offset = c.num_layers, self.norm_offset
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, num_layers=L, offset=offset)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, num_layers=L, offset=offset)

    def project_qkv(self, x, layer, rows, cos, sin):
        c, T = self.config, x.shape[0]
        qkv = self.qkv_proj(x, layer, rows)
        q = qkv[:, : c.q_size].reshape(T, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size : c.q_size + c.kv_size].reshape(T, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size :].reshape(T, c.num_kv_heads, c.head_dim)
        q = apply_rope(self.q_norm(q, layer), cos, sin)  # per-head norm, then rotate
        k = apply_rope(self.k_norm(k, layer), cos, sin)
        return q, k, v


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layers = Qwen3DecoderLayers

    @classmethod
    def layer_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        out = super().layer_tensors(tensors, config, i)
        p = f"model.layers.{i}.self_attn."
        out["q_norm"] = {"scale": hf_tensor(tensors, p + "q_norm.weight")}
        out["k_norm"] = {"scale": hf_tensor(tensors, p + "k_norm.weight")}
        return out
