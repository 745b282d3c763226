"""Paged-attention kernels over a global KV page pool, with one switch that picks the backend.

This package stands alone (it imports nothing from pagedjax): a kernel sees query rows, the page
pool and an `AttentionMetadata`, never the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

from pallas_kernels.metadata import AttentionMetadata, empty_metadata
from pallas_kernels.reference import gather_all_paged_attention, paged_attention, write_kv

BACKENDS = ("auto", "xla")


def get_attention_backend(name: str = "auto") -> Callable:
    """Return the paged-attention function for `name` ("auto" picks the fastest correct one here)."""
    if name in ("auto", "xla"):
        return paged_attention
    if name == "pallas":
        raise NotImplementedError("the Pallas paged-attention backend is not built yet; use 'xla' or 'auto'")
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")


__all__ = [
    "AttentionMetadata",
    "empty_metadata",
    "gather_all_paged_attention",
    "get_attention_backend",
    "paged_attention",
    "write_kv",
]
