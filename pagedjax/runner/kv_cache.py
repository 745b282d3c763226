"""The device memory of the global KV page pool: one K and one V buffer for all layers.

    k_cache, v_cache: [num_layers, num_kv_heads, num_pages, block_size, head_dim]   (KV-head-major)

Allocated once; every jitted step donates them and gets them back updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pagedjax.config import CacheConfig, ModelConfig
from pallas_kernels.reference import BF16_STORAGE

DEFAULT_CPU_KV_BYTES = 2 * 1024**3


def bytes_per_page(model: ModelConfig, block_size: int, dtype: jnp.dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize


def kv_budget_bytes(cache: CacheConfig, weight_bytes: int) -> int:
    """Bytes for the pool: the explicit budget, else a fraction of accelerator memory, else 2 GiB."""
    if cache.kv_cache_memory is not None:
        return int(cache.kv_cache_memory)
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            in_use = stats.get("bytes_in_use", weight_bytes)
            return max(int(limit * cache.gpu_memory_utilization) - in_use, 0)
    return DEFAULT_CPU_KV_BYTES


def num_pages_for(
    model: ModelConfig, cache: CacheConfig, dtype: jnp.dtype, weight_bytes: int, max_useful_pages: int
) -> int:
    """Pages the pool gets: from the budget, but never more than can ever be in use at once."""
    if cache.num_pages is not None:
        return cache.num_pages
    pages = kv_budget_bytes(cache, weight_bytes) // bytes_per_page(model, cache.block_size, dtype)
    return int(max(1, min(pages, max_useful_pages)))


def storage_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """bfloat16 pools hold uint16 bit patterns (see pallas_kernels.reference.BF16_STORAGE)."""
    return BF16_STORAGE if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def allocate_kv_cache(model: ModelConfig, num_pages: int, block_size: int, dtype: jnp.dtype):
    shape = (model.num_layers, model.num_kv_heads, num_pages, block_size, model.head_dim)
    return jnp.zeros(shape, storage_dtype(dtype)), jnp.zeros(shape, storage_dtype(dtype))


def _copy_pages_impl(k_cache, v_cache, src, dst):
    k_cache = k_cache.at[:, :, dst].set(k_cache[:, :, src], mode="drop")
    v_cache = v_cache.at[:, :, dst].set(v_cache[:, :, src], mode="drop")
    return k_cache, v_cache


# Whole pages src -> dst in every layer, in place (donated); dst == num_pages is padding (dropped).
copy_pages = jax.jit(_copy_pages_impl, donate_argnums=(0, 1))
