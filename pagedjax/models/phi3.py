"""Phi-3 (and Phi-3.5 / Phi-4-mini): the Llama decoder with q/k/v and gate/up each stored as one
fused projection (`qkv_proj`, `gate_up_proj`), LongRoPE ("longrope", formerly "su") scaling with
short and long factor sets (layers/rope.py), and partial rotary (Phi-4-mini rotates 3/4 of each
head). The module is LlamaForCausalLM's: only the checkpoint names differ, and the fused layouts
are already the ones this engine uses ([q; k; v] rows, [gate; up] rows)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pagedjax.config import ModelConfig
from pagedjax.models.llama import LlamaForCausalLM
from pagedjax.models.params import hf_tensor


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def qkv_kernel(cls, get: Callable[[str], np.ndarray]) -> np.ndarray:
        return get("self_attn.qkv_proj.weight").T  # stored fused, [q; k; v] rows

    @classmethod
    def mlp_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        p = f"model.layers.{i}.mlp."
        return {
            "gate_up_proj": {"kernel": hf_tensor(tensors, p + "gate_up_proj.weight").T},
            "down_proj": {"kernel": hf_tensor(tensors, p + "down_proj.weight").T},
        }
