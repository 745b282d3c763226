"""Mixtral: the Mistral decoder with a mixture-of-experts MLP in every layer (softmax router, top-2
of 8 experts by default, the chosen weights renormalised to sum to 1; SwiGLU experts).
Hub checkpoints name the experts `block_sparse_moe.experts.{j}.w1/w3/w2` (gate/up/down)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.layers.moe import MoEBlock
from pagedjax.models.llama import LlamaDecoderLayers, LlamaForCausalLM
from pagedjax.models.params import hf_experts, hf_tensor


def moe_block(c: ModelConfig, dtype) -> MoEBlock:
    return MoEBlock(
        c.hidden_size,
        c.moe_intermediate_size,
        c.num_experts,
        c.num_experts_per_tok,
        dtype,
        num_layers=c.num_layers,
        normalize=c.norm_topk_prob,
        shared_hidden=c.shared_expert_intermediate_size,
    )


class MixtralDecoderLayers(LlamaDecoderLayers):
    def build_mlp(self, c: ModelConfig, dtype):
        return moe_block(c, dtype)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layers = MixtralDecoderLayers
    swiglu_kernels = ()
    # (prefix of the MoE block in a layer, names of the experts' gate, up and down weights)
    moe_names: tuple[str, tuple[str, str, str]] = ("block_sparse_moe.", ("w1", "w3", "w2"))

    @classmethod
    def mlp_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        block, expert_names = cls.moe_names
        for prefix in (f"model.layers.{i}.{block}", f"model.layers.{i}.mlp."):  # hub, transformers 5
            if prefix + "gate.weight" in tensors:
                router = hf_tensor(tensors, prefix + "gate.weight").T  # [H, E]
                return {"router": router, **hf_experts(tensors, prefix, config.num_experts, expert_names)}
        return {"router": hf_tensor(tensors, f"model.layers.{i}.{block}gate.weight")}  # names the miss
