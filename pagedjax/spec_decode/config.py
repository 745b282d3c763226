"""`SpeculativeConfig`: what `speculative_config` (EngineArgs, `LLM`, `--speculative-config`) holds.

vLLM's keys: ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
"prompt_lookup_max": 4, "disable_by_batch_size": 32}``, or ``{"method": "layer_skip",
"num_draft_layers": 15, "num_speculative_tokens": 3}`` (self-speculation), or ``{"method":
"draft_model", "model": "path/to/small_model", "num_speculative_tokens": 4}``. An unknown method or
key, or a value out of
range, is a ValueError before any request is queued.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "layer_skip", "draft_model")
# Methods named by the design that are not built yet: a clear error instead of silently ignoring.
PLANNED_METHODS = ("eagle",)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2  # ngram: shortest suffix that may match
    prompt_lookup_max: int = 4  # ngram: longest suffix tried first
    disable_by_batch_size: int | None = None  # no drafts in a step when more requests run
    num_draft_layers: int | None = None  # layer_skip: the target's first m layers draft
    model: str | None = None  # draft_model: HF folder or .gguf of a smaller model, same vocabulary

    def __post_init__(self) -> None:
        if self.method in PLANNED_METHODS:
            raise ValueError(
                f"speculative_config method {self.method!r} is not implemented yet; "
                f"available: {list(METHODS)}"
            )
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(
                "speculative_config num_speculative_tokens must be an int >= 1, got "
                f"{self.num_speculative_tokens!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.method == "layer_skip" and (
            not isinstance(self.num_draft_layers, int) or self.num_draft_layers < 1
        ):
            raise ValueError(
                f"speculative_config layer_skip needs num_draft_layers >= 1, got {self.num_draft_layers!r}"
            )
        if self.method != "layer_skip" and self.num_draft_layers is not None:
            raise ValueError("speculative_config num_draft_layers applies to method 'layer_skip' only")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError(
                "speculative_config 'model' (the draft model's path) is required by method "
                "'draft_model' and applies to it only"
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(
                f"speculative_config disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}"
            )

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From a JSON string (the CLI flag), a dict (`LLM(speculative_config={...})`) or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(names)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        return cls(**value)

    def active(self, num_running: int) -> bool:
        """Whether to draft in a step with `num_running` requests (spare compute runs out as the
        batch fills, and verifying drafts then costs more than it saves)."""
        return self.disable_by_batch_size is None or num_running <= self.disable_by_batch_size
