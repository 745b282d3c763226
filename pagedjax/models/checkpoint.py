"""Save and restore a loaded model (parameter pytree + config + tokenizer) with orbax.

A converted checkpoint skips GGUF dequantisation / safetensors stacking on the next load, and is the
format a research run writes after changing weights in a notebook:

    save_checkpoint("/tmp/ckpt", llm.llm_engine.model)
    LLM("/tmp/ckpt")
"""

from __future__ import annotations

import dataclasses
import json
import os

from pagedjax.config import ModelConfig
from pagedjax.models.layers.linear import unpack_params
from pagedjax.models.loaded_model import LoadedModel
from pagedjax.models.params import cast_state

CONFIG_FILE = "pagedjax_config.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))


def save_checkpoint(path: str, model: LoadedModel) -> str:
    """Write `model` (a LoadedModel) to the folder `path` (created; must not hold a checkpoint)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        params = unpack_params(model.params, model.config.tie_word_embeddings)
        ckptr.save(os.path.join(path, PARAMS_DIR), params)
    cfg = dataclasses.asdict(model.config)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"name": model.name, "config": cfg}, f, indent=2)
    model.tokenizer.save_pretrained(path)
    return path


def load_checkpoint(path: str, dtype: str) -> LoadedModel:
    """Restore a checkpoint written by save_checkpoint, casting matmul weights to `dtype`."""
    import orbax.checkpoint as ocp
    from transformers import AutoTokenizer

    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    config = ModelConfig.from_dict(meta["config"])
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS_DIR))
    params = cast_state(params, dtype)
    return LoadedModel(
        name=meta["name"], config=config, params=params, tokenizer=AutoTokenizer.from_pretrained(path)
    )
