"""Dataclass configs: what the model is, how the KV cache is sized, how the scheduler batches.

They are plain frozen dataclasses so a researcher can print, compare and tweak them in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from a Hugging Face `config.json` or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF `rope_scaling` / `rope_parameters` dict (only llama3-style scaling changes frequencies here).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (the parsed `config.json`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "unknown")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        num_kv = cfg.get("num_key_value_heads") or num_heads
        scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters")  # transformers 5 spelling
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        model_type = cfg.get("model_type", "")
        attention_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass(frozen=True)
class CacheConfig:
    """The global KV page pool: `num_pages` pages of `block_size` tokens each, for every layer."""

    block_size: int = 16
    # Bytes for K and V of all layers together. None -> `gpu_memory_utilization` on accelerators,
    # or a CPU default (see runner.kv_cache.pages_for_budget).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.85
    cache_dtype: str | None = None  # None -> model dtype
    num_pages: int | None = None  # overrides the byte budget (tests use tiny pools)
    # Keep full pages findable by content so later requests with the same prefix reuse them.
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024
    max_model_len: int = 2048
    # Most prefill sequences packed into one step (bounds the sampler's row count per step).
    max_num_prefill_seqs: int = 32
    policy: str = "fcfs"  # "fcfs" or "priority"


@dataclass(frozen=True)
class EngineConfig:
    model: str | None
    dtype: str
    seed: int
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    matmul_backend: str = "auto"  # "auto" | "xla" | "cpu" (models/layers/linear.py)
    warmup: bool = True
    compilation_cache_dir: str | None = None
