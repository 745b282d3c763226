"""Which Hugging Face `architectures` pagedjax can run: one `nnx` module class for each."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from pagedjax.config import ModelConfig
from pagedjax.models.functional import make_forward, make_layer_skip_draft
from pagedjax.models.gemma2 import Gemma2ForCausalLM
from pagedjax.models.gemma3 import Gemma3ForCausalLM
from pagedjax.models.llama import LlamaForCausalLM
from pagedjax.models.mixtral import MixtralForCausalLM
from pagedjax.models.phi3 import Phi3ForCausalLM
from pagedjax.models.qwen2_moe import Qwen2MoeForCausalLM
from pagedjax.models.qwen3 import Qwen3ForCausalLM
from pagedjax.models.qwen3_moe import Qwen3MoeForCausalLM

# Llama, Mistral and Qwen2 are the same decoder; their differences (GQA, QKV bias, tied
# embeddings, RoPE scaling, sliding window) are fields of ModelConfig.
_ARCHITECTURES: dict[str, type[nnx.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}
_FORWARDS: dict[type, Callable] = {}
_DRAFTS: dict[type, Callable] = {}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no model definition here."""


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(config: ModelConfig) -> type[nnx.Module]:
    try:
        return _ARCHITECTURES[config.architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        ) from None


def get_forward(config: ModelConfig) -> Callable:
    """The pure step function of the config's architecture (see models/functional.py)."""
    cls = get_model_class(config)
    if cls not in _FORWARDS:
        _FORWARDS[cls] = make_forward(cls)
    return _FORWARDS[cls]


def get_layer_skip_draft(config: ModelConfig) -> Callable:
    """The architecture's self-speculative draft function (see models/functional.py)."""
    cls = get_model_class(config)
    if cls not in _DRAFTS:
        _DRAFTS[cls] = make_layer_skip_draft(cls)
    return _DRAFTS[cls]


def build_params(tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype) -> dict:
    """The model state (nested dict of arrays) from Hugging Face-named tensors."""
    return get_model_class(config).state_from_hf(tensors, config, dtype)
