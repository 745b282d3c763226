"""RoPE variants (models/layers/rope.py) against Hugging Face's rotary embeddings: the cos/sin
tables for every scaling this engine implements, at positions on both sides of LongRoPE's switch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pagedjax.config import ModelConfig
from pagedjax.models.layers.rope import rotary_embeddings


def _hf_tables(rotary, positions: np.ndarray, **kwargs):
    x = torch.zeros(1, len(positions), 1)
    pos = torch.tensor(positions[None, :], dtype=torch.long)
    cos, sin = rotary(x, pos, **kwargs)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _ours(table, positions: np.ndarray):
    cos, sin = table.tables(np.asarray(positions, np.int32))
    return np.asarray(cos)[:, 0], np.asarray(sin)[:, 0]


def _configs(model_dir, variant):
    from transformers import AutoConfig

    path = model_dir(variant)
    with open(os.path.join(path, "config.json")) as f:
        ours = ModelConfig.from_hf_config(json.load(f))
    return ours, AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("block", ["short", "long"])
def test_longrope_tables_match_hf(model_dir, block):
    """Phi-3: below original_max_position_embeddings (64 here) HF uses the short factors, at or past
    it the long ones (its choice is by sequence length; a decode step's sequence length is its
    position + 1); both scaled by the attention factor, over the rotated 3/4 of each head."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    ours, hf_cfg = _configs(model_dir, "phi3")
    table = rotary_embeddings(ours)["global"]
    assert table.rotary_dim == 12 and table.long_from == 64 and table.attention_factor > 1.0
    rotary = Phi3RotaryEmbedding(hf_cfg)
    # HF switches the whole call by its largest position, so each side is asked separately.
    positions = np.arange(0, 64) if block == "short" else np.arange(64, 300)
    for a, b in zip(_ours(table, positions), _hf_tables(rotary, positions), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    if block == "long":  # the two factor sets really differ there
        short = ModelConfig(**{**ours.__dict__, "rope_scaling": None})
        plain = rotary_embeddings(short)["global"]
        assert np.abs(_ours(plain, positions)[0] - _ours(table, positions)[0]).max() > 0.1


def test_gemma3_local_and_global_tables_match_hf(model_dir):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    ours, hf_cfg = _configs(model_dir, "gemma3")
    tables = rotary_embeddings(ours)
    rotary = Gemma3RotaryEmbedding(hf_cfg)
    positions = np.arange(0, 200)
    for name, layer_type in (("global", "full_attention"), ("local", "sliding_attention")):
        want = _hf_tables(rotary, positions, layer_type=layer_type)
        for a, b in zip(_ours(tables[name], positions), want, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_llama3_tables_match_hf(model_dir):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ours, hf_cfg = _configs(model_dir, "llama3")
    positions = np.arange(0, 300)
    want = _hf_tables(LlamaRotaryEmbedding(hf_cfg), positions)
    for a, b in zip(_ours(rotary_embeddings(ours)["global"], positions), want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_unknown_rope_scaling_is_a_clear_error():
    cfg = ModelConfig.from_dict(
        {
            **ModelConfig.from_hf_config(
                {
                    "architectures": ["LlamaForCausalLM"],
                    "vocab_size": 8,
                    "hidden_size": 8,
                    "intermediate_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                }
            ).__dict__,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        }
    )
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        rotary_embeddings(cfg)
