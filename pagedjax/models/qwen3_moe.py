"""Qwen3-MoE: Qwen3's attention (q/k norms) with a mixture-of-experts MLP in every layer (softmax
router over e.g. 128 experts, top 8, renormalised when `norm_topk_prob`; SwiGLU experts, no shared
expert). Hub checkpoints name the experts `mlp.experts.{j}.gate_proj/up_proj/down_proj`."""

from __future__ import annotations

from pagedjax.config import ModelConfig
from pagedjax.models.mixtral import MixtralForCausalLM, moe_block
from pagedjax.models.qwen3 import Qwen3DecoderLayers, Qwen3ForCausalLM


class Qwen3MoeDecoderLayers(Qwen3DecoderLayers):
    def build_mlp(self, c: ModelConfig, dtype):
        return moe_block(c, dtype)


class Qwen3MoeForCausalLM(MixtralForCausalLM, Qwen3ForCausalLM):
    decoder_layers = Qwen3MoeDecoderLayers
    moe_names = ("mlp.", ("gate_proj", "up_proj", "down_proj"))
