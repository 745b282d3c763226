"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV bias) with a mixture-of-experts
MLP whose routed experts (softmax router, top k, renormalised only when `norm_topk_prob`) are joined
by one shared expert every token passes through, scaled by sigmoid(x @ shared_expert_gate)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.llama import gated_mlp_tensors
from pagedjax.models.mixtral import MixtralForCausalLM
from pagedjax.models.params import hf_tensor


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    moe_names = ("mlp.", ("gate_proj", "up_proj", "down_proj"))

    @classmethod
    def mlp_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        out = super().mlp_tensors(tensors, config, i)
        p = f"model.layers.{i}.mlp."
        out["shared_expert"] = gated_mlp_tensors(tensors, p + "shared_expert.")
        out["shared_expert_gate"] = hf_tensor(tensors, p + "shared_expert_gate.weight").T  # [H, 1]
        return out
