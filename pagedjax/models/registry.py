"""Which Hugging Face `architectures` pagedjax can run, and the forward function for each."""

from __future__ import annotations

from collections.abc import Callable

from pagedjax.config import ModelConfig
from pagedjax.models import llama

# All of these are the same decoder; differences (GQA, QKV bias, tied embeddings, RoPE scaling,
# sliding window) are fields of ModelConfig.
_ARCHITECTURES: dict[str, Callable] = {
    "LlamaForCausalLM": llama.forward,
    "MistralForCausalLM": llama.forward,
    "Qwen2ForCausalLM": llama.forward,
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no model definition here."""


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_forward(config: ModelConfig) -> Callable:
    try:
        return _ARCHITECTURES[config.architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        ) from None
