"""Shared fixtures: small random Hugging Face models written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(variant, **overrides) -> path of a cached small random HF model."""
    from pagedjax.testing.model_factory import make_test_model

    cache: dict[tuple, str] = {}

    def get(variant: str = "llama", **overrides) -> str:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "-".join([variant, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            cache[key] = make_test_model(tmp_path_factory.mktemp(name), variant, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(path) -> cached float32 transformers model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    cache: dict[str, object] = {}

    def get(path: str):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get
