"""pagedjax: a JAX/XLA research engine for LLM inference (paged KV cache, continuous batching)."""

from pagedjax.engine.errors import EngineStepError, InvalidRequestError
from pagedjax.engine.llm_engine import LLMEngine
from pagedjax.engine_args import EngineArgs
from pagedjax.llm import LLM
from pagedjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedjax.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

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
