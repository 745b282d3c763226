"""`LoadedModel`: what a loader returns (weights + config + tokenizer).

Its own module so that loader.py (which dispatches to checkpoint.py) and checkpoint.py (which
returns one) both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedjax.config import ModelConfig


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: dict
    tokenizer: Any  # a transformers PreTrainedTokenizerFast


__all__ = ["LoadedModel"]
