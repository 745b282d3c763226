"""pagedjax: a JAX/XLA research engine for LLM inference (paged KV cache, continuous batching).

The public names are loaded on first use, so `import pagedjax.platform` or `pagedjax.envs` (or the
host-only scheduler in `pagedjax.core`) does not pull in JAX and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedjax.llm",
    "LLMEngine": "pagedjax.engine.llm_engine",
    "EngineArgs": "pagedjax.engine_args",
    "EngineStepError": "pagedjax.engine.errors",
    "InvalidRequestError": "pagedjax.engine.errors",
    "CompletionOutput": "pagedjax.outputs",
    "RequestMetrics": "pagedjax.outputs",
    "RequestOutput": "pagedjax.outputs",
    "BeamSearchParams": "pagedjax.sampling_params",
    "SamplingParams": "pagedjax.sampling_params",
}

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineArgs",
    "EngineStepError",
    "InvalidRequestError",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from pagedjax.engine.errors import EngineStepError, InvalidRequestError
    from pagedjax.engine.llm_engine import LLMEngine
    from pagedjax.engine_args import EngineArgs
    from pagedjax.llm import LLM
    from pagedjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from pagedjax.sampling_params import BeamSearchParams, SamplingParams


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
