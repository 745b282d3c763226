"""Turn Hugging Face-named tensors into the stacked, fused parameter pytree the model runs on.

Every loader (safetensors folder, GGUF file) first produces tensors under their Hugging Face names
and layouts (`model.layers.0.self_attn.q_proj.weight`, Linear weights as [out, in]); this module is
the one place that knows how pagedjax lays them out:

    params = {
      "embed":      [V, H],
      "final_norm": [H],
      "lm_head":    [H, V]            (absent when embeddings are tied),
      "layers": {                     (stacked over layers, scanned with lax.scan)
        "attn_norm": [L, H],
        "wqkv":      [L, H, q + 2*kv] (fused q, k, v projections, x @ W layout),
        "bqkv":      [L, q + 2*kv]    (only with attention bias, e.g. Qwen2),
        "wo":        [L, q, H],
        "mlp_norm":  [L, H],
        "w_gate_up": [L, H, 2*F]      (fused gate and up projections),
        "w_down":    [L, F, H],
      },
    }

Fusing q/k/v and gate/up gives fewer, larger matmuls, which is what the CPU (and every
accelerator) runs best.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from pagedjax.config import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


class MissingWeightError(KeyError):
    """A tensor the architecture needs is not in the checkpoint."""


def _get(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise MissingWeightError(f"checkpoint has no tensor named {name!r}")
    return np.asarray(tensors[name], dtype=np.float32)


def build_params(tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype: str | jnp.dtype) -> dict:
    """Stack and fuse HF-named tensors into pagedjax's parameter pytree (see module docstring).

    Norm weights stay float32 (they are tiny and keep the RMS norm exact); matmul weights take `dtype`.
    """
    dt = resolve_dtype(dtype)
    L = config.num_layers
    layers: dict[str, list[np.ndarray]] = {
        k: [] for k in ("attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
    }
    for i in range(L):
        p = f"model.layers.{i}."
        q = _get(tensors, p + "self_attn.q_proj.weight")
        k = _get(tensors, p + "self_attn.k_proj.weight")
        v = _get(tensors, p + "self_attn.v_proj.weight")
        layers["wqkv"].append(np.concatenate([q, k, v], axis=0).T)
        if config.attention_bias:
            layers["bqkv"].append(
                np.concatenate(
                    [
                        _get(tensors, p + "self_attn.q_proj.bias"),
                        _get(tensors, p + "self_attn.k_proj.bias"),
                        _get(tensors, p + "self_attn.v_proj.bias"),
                    ]
                )
            )
        layers["wo"].append(_get(tensors, p + "self_attn.o_proj.weight").T)
        layers["attn_norm"].append(_get(tensors, p + "input_layernorm.weight"))
        layers["mlp_norm"].append(_get(tensors, p + "post_attention_layernorm.weight"))
        gate = _get(tensors, p + "mlp.gate_proj.weight")
        up = _get(tensors, p + "mlp.up_proj.weight")
        layers["w_gate_up"].append(np.concatenate([gate, up], axis=0).T)
        layers["w_down"].append(_get(tensors, p + "mlp.down_proj.weight").T)

    norm_keys = {"attn_norm", "mlp_norm", "bqkv"}
    stacked = {
        k: jnp.asarray(np.stack(v), dtype=jnp.float32 if k in norm_keys else dt)
        for k, v in layers.items()
        if v
    }
    embed = _get(tensors, "model.embed_tokens.weight")
    params = {
        "embed": jnp.asarray(embed, dtype=dt),
        "final_norm": jnp.asarray(_get(tensors, "model.norm.weight"), dtype=jnp.float32),
        "layers": stacked,
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(_get(tensors, "lm_head.weight").T, dtype=dt)
    return params


def count_params(params: dict) -> int:
    import jax

    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
