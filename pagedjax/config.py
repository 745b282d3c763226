"""Dataclass configs: what the model is, how the KV cache is sized, how the scheduler batches.

They are plain frozen dataclasses so a researcher can print, compare and tweak them in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedjax.spec_decode.config import SpeculativeConfig


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer, read from a Hugging Face `config.json` or GGUF metadata.

    The common Llama fields first; then the quirks of the other architectures (Gemma's soft caps
    and sliding/global layer pattern, Phi-3's partial rotary, the MoE router), each with the default
    that makes it a no-op, so one config type serves every module in `pagedjax/models/`."""

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
    # --- per-layer attention pattern (Gemma 2/3, Qwen2 max_window_layers): HF `layer_types`,
    # "sliding_attention" or "full_attention" per layer; None: every layer uses `sliding_window`.
    layer_types: tuple[str, ...] | None = None
    sliding_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers
    # --- Gemma
    hidden_act: str = "silu"  # the gated MLP's activation ("gelu_pytorch_tanh" for Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # --- Phi-3: RoPE rotates the first partial_rotary_factor * head_dim dims of each head
    partial_rotary_factor: float = 1.0
    # --- mixture of experts (Mixtral, Qwen3-MoE): 0 experts = a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's hidden size
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    # Qwen2-MoE: one always-on expert of this hidden size beside the routed ones, scaled by a
    # sigmoid gate (0: none)
    shared_expert_intermediate_size: int = 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `dataclasses.asdict` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: _freeze(v) for k, v in d.items()})

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (the parsed `config.json`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "unknown")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        num_kv = cfg.get("num_key_value_heads") or num_heads
        model_type = cfg.get("model_type", "")
        scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters")  # transformers 5 spelling
        rope_theta = cfg.get("rope_theta")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if scaling is not None and model_type == "phi3":
            # Phi-3 checkpoints spell LongRoPE "su" or "yarn" (transformers maps both to longrope) and
            # keep original_max_position_embeddings beside rope_scaling rather than in it.
            scaling = dict(scaling)
            if scaling.get("rope_type", scaling.get("type")) in ("su", "yarn", "longrope"):
                scaling["rope_type"] = "longrope"
            if "original_max_position_embeddings" in cfg:
                original = cfg["original_max_position_embeddings"]
                scaling.setdefault("original_max_position_embeddings", original)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        attention_bias = (
            bool(cfg.get("attention_bias", False))
            or model_type == "qwen2"
            or (model_type == "qwen2_moe" and cfg.get("qkv_bias", True))
        )
        layer_types = cfg.get("layer_types")
        if sliding is None or not layer_types or "sliding_attention" not in layer_types:
            layer_types = None
        sliding_theta = None
        if isinstance(rope_params, dict) and "full_attention" in rope_params:  # Gemma 3: per type
            full, local = rope_params["full_attention"], rope_params.get("sliding_attention", {})
            rope_theta = full.get("rope_theta", rope_theta)
            scaling = full if full.get("rope_type", "default") != "default" else None
            sliding_theta = local.get("rope_theta")
        if model_type == "gemma3_text" and sliding_theta is None:  # transformers 4 spelling
            sliding_theta = cfg.get("rope_local_base_freq", 10000.0)
        if isinstance(rope_params, dict):
            partial = rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        else:
            partial = cfg.get("partial_rotary_factor", 1.0)
        num_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        if num_experts and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
            raise ValueError(
                "MoE models with dense layers in between (mlp_only_layers, "
                "decoder_sparse_step != 1) are not supported"
            )
        soft = cfg.get("attn_logit_softcapping"), cfg.get("final_logit_softcapping")
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
            rope_scaling=_freeze(scaling) if scaling else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_types=tuple(layer_types) if layer_types else None,
            sliding_rope_theta=float(sliding_theta) if sliding_theta is not None else None,
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            attn_logit_softcapping=float(soft[0]) if soft[0] else None,
            final_logit_softcapping=float(soft[1]) if soft[1] else None,
            partial_rotary_factor=float(partial or 1.0),
            num_experts=int(num_experts),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
            if num_experts
            else 0,
            # Mixtral always renormalises; the Qwen MoE configs default to not renormalising.
            norm_topk_prob=bool(cfg.get("norm_topk_prob", not model_type.startswith("qwen"))),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if num_experts
            else 0,
        )


def _freeze(x: Any) -> Any:
    """Lists and dicts (from JSON or a HF config) as tuples, so a ModelConfig stays hashable."""
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


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
    # Speculative decoding: most draft tokens one request verifies per step (0: off).
    num_speculative_tokens: int = 0
    # Most requests verifying drafts in one step (bounds the verification logits rows); the engine
    # sets it from disable_by_batch_size; the default caps nothing.
    max_num_spec_seqs: int = 2**31 - 1


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
    speculative: SpeculativeConfig | None = None  # speculative decoding (pagedjax/spec_decode/)
