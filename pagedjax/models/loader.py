"""Load a model by name or path: the built-in default (GGUF), a .gguf file, or a Hugging Face folder."""

from __future__ import annotations

import os

from pagedjax.config import ModelConfig
from pagedjax.models.checkpoint import is_checkpoint, load_checkpoint
from pagedjax.models.loaded_model import LoadedModel
from pagedjax.models.registry import build_params, get_model_class


def _find_gguf(path: str) -> str | None:
    if path.endswith(".gguf") and os.path.isfile(path):
        return path
    if os.path.isdir(path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if ggufs and not os.path.exists(os.path.join(path, "config.json")):
            return os.path.join(path, ggufs[0])
    return None


def load_model(model: str | None, dtype: str) -> LoadedModel:
    """Load weights + tokenizer. `model=None` is the built-in SmolLM2-135M-Instruct GGUF."""
    from pagedjax.models import loader_hf

    if model is None:
        from pagedjax.models.default_model import DEFAULT_MODEL_NAME, default_model_path

        path, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        path, name = model, model
    if is_checkpoint(path):
        loaded = load_checkpoint(path, dtype)
        get_model_class(loaded.config)
        return loaded
    gguf_path = _find_gguf(path)
    if gguf_path is not None:
        from pagedjax.models.loader_gguf import load_gguf_tokenizer, read_gguf

        ckpt = read_gguf(gguf_path)
        config = ModelConfig.from_hf_config(ckpt.hf_config)
        get_model_class(config)
        tensors, tokenizer = ckpt.tensors, load_gguf_tokenizer(gguf_path)
    elif loader_hf.is_hf_folder(path):
        from transformers import AutoTokenizer

        config = ModelConfig.from_hf_config(loader_hf.read_hf_config(path))
        get_model_class(config)  # fail on an unsupported architecture before reading weights
        tensors = loader_hf.read_hf_tensors(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise FileNotFoundError(
            f"model {model!r} is neither a Hugging Face folder (config.json + safetensors), a .gguf file, "
            "nor a pagedjax (orbax) checkpoint"
        )
    return LoadedModel(
        name=name, config=config, params=build_params(tensors, config, dtype), tokenizer=tokenizer
    )


__all__ = ["LoadedModel", "load_model"]  # LoadedModel: re-exported (defined in loaded_model.py)
