"""Helpers every model's loader uses to turn Hugging Face-named tensors into its module state.

Every loader (safetensors folder, GGUF file) first produces tensors under their Hugging Face names
and layouts (`model.layers.0.self_attn.q_proj.weight`, Linear weights as [out, in]); each
architecture's `state_from_hf` (e.g. `LlamaForCausalLM.state_from_hf`) then builds its module
state, a nested dict of arrays mirroring the module tree, e.g. for Llama:

    {"embed": {"embedding": [V, H]},
     "layers": {                                   (stacked over layers, scanned with lax.scan)
        "attn_norm": {"scale": [L, H]},
        "qkv_proj": {"kernel": [L, H, q + 2*kv], "bias": [L, q + 2*kv] (Qwen2)},   (x @ W layout)
        "o_proj": {"kernel": [L, q, H]},
        "mlp_norm": {"scale": [L, H]},
        "mlp": {"gate_up_proj": {"kernel": [L, H, 2*F]}, "down_proj": {"kernel": [L, F, H]}}},
                                                   (MoE: "mlp": {"router": [L, H, E],
                                                    "experts_gate_up": [L, E, H, 2*F],
                                                    "experts_down": [L, E, F, H]})
     "final_norm": {"scale": [H]},
     "lm_head": {"kernel": [H, V]}}                (absent when embeddings are tied)

Fusing q/k/v and gate/up gives fewer, larger matmuls, which is what the CPU (and every
accelerator) runs best.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


class MissingWeightError(KeyError):
    """A tensor the architecture needs is not in the checkpoint."""


def hf_tensor(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """The float32 tensor `name`, or MissingWeightError naming it."""
    if name not in tensors:
        raise MissingWeightError(f"checkpoint has no tensor named {name!r}")
    return np.asarray(tensors[name], dtype=np.float32)


def stack_layers(per_layer: Sequence[dict]) -> dict:
    """Per-layer state dicts (same structure) -> one dict of arrays stacked on a leading layer axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)


MATMUL_LEAVES = ("kernel", "embedding", "experts_gate_up", "experts_down")


def is_matmul_weight(path) -> bool:
    """True for a state leaf that takes the model dtype: a `Linear` kernel, an embedding table,
    MoE expert weights. Norm scales, biases and MoE routers are tiny and stay float32 (that keeps
    the RMS norm exact and the expert choice stable)."""
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    return name in MATMUL_LEAVES


def cast_state(state: dict, dtype: str | jnp.dtype) -> dict:
    """Kernels and embeddings to `dtype`, everything else float32 (see `is_matmul_weight`)."""
    dt = resolve_dtype(dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(x, dt if is_matmul_weight(path) else jnp.float32), state
    )


def count_params(params: dict) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def hf_experts(
    tensors: Mapping[str, np.ndarray], prefix: str, num_experts: int, names: tuple[str, str, str]
) -> dict[str, np.ndarray]:
    """One MoE layer's expert weights in the x @ W layout: experts_gate_up [E, H, 2F] (gate | up)
    and experts_down [E, F, H]. Reads per-expert tensors (`{prefix}experts.{j}.{gate}.weight`,
    the hub's layout) or the fused `{prefix}experts.gate_up_proj` [E, 2F, H] / `down_proj`
    [E, H, F] that transformers 5 keeps in memory."""
    fused = prefix + "experts.gate_up_proj"
    if fused in tensors:
        gate_up = hf_tensor(tensors, fused).transpose(0, 2, 1)
        down = hf_tensor(tensors, prefix + "experts.down_proj").transpose(0, 2, 1)
        return {"experts_gate_up": gate_up, "experts_down": down}
    gate, up, down = names
    per = [
        [hf_tensor(tensors, f"{prefix}experts.{j}.{n}.weight") for n in (gate, up, down)]
        for j in range(num_experts)
    ]
    return {
        "experts_gate_up": np.stack([np.concatenate([g, u]).T for g, u, _ in per]),
        "experts_down": np.stack([d.T for _, _, d in per]),
    }
