"""Paged-attention kernels over a global KV page pool, with one switch that picks the backend.

This package stands alone (it imports nothing from pagedjax): a kernel sees query rows, the page
pool and an `AttentionMetadata`, never the scheduler.

Backends (all share the signature of `reference.paged_attention`):
  "xla"    plain jax.numpy/lax (reference.py): runs everywhere, the reference for tests.
  "pallas" Pallas kernels (ragged_paged_attention.py): Triton on GPU, Mosaic on TPU,
           interpret mode on CPU (slow; for tests).
  "cpu"    a compiled XLA:CPU FFI kernel (cpu/): reads the pool in place, no gather copies.
  "auto"   the fastest correct backend for the platform (see `resolve_backend`).
Each backend lives in its own module and is imported lazily, so a backend that cannot load on this
machine never breaks the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax

from pallas_kernels.metadata import AttentionMetadata, empty_metadata
from pallas_kernels.reference import gather_all_paged_attention, paged_attention, write_kv

BACKENDS = ("auto", "xla", "pallas", "cpu")

# name -> (module, attribute) of the paged-attention function.
_BACKEND_FUNCTIONS = {
    "xla": ("pallas_kernels.reference", "paged_attention"),
    "pallas": ("pallas_kernels.ragged_paged_attention", "paged_attention"),
    "cpu": ("pallas_kernels.cpu", "paged_attention"),
}


def resolve_backend(
    name: str = "auto",
    platform: str | None = None,
    *,
    head_dim: int | None = None,
    page_size: int | None = None,
) -> str:
    """Map "auto" to a concrete backend name for `platform` (default: JAX's default backend).

    GPU: the Pallas/Triton kernel when the model's head_dim and the page size suit Triton (powers of
    two, >= 16), else plain XLA. TPU: plain XLA (the Pallas kernel uses vector gathers Mosaic lacks).
    CPU: the compiled FFI kernel when it builds here, else plain XLA.
    """
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas" if _triton_shapes_ok(head_dim, page_size) else "xla"
    if platform == "tpu":
        return "xla"
    return _auto_cpu_backend()


def _triton_shapes_ok(head_dim: int | None, page_size: int | None) -> bool:
    if head_dim is None or page_size is None:
        return True
    from pallas_kernels.ragged_paged_attention import _check_triton_shapes

    try:
        _check_triton_shapes(head_dim, page_size, 4)  # the kernel's default pages_per_chunk
    except ValueError:
        return False
    return True


def _auto_cpu_backend() -> str:
    """On CPU: the compiled FFI kernel when it builds and loads here, else plain XLA."""
    try:
        cpu = importlib.import_module("pallas_kernels.cpu")
    except ImportError:
        return "xla"
    return "cpu" if getattr(cpu, "is_available", lambda: False)() else "xla"


def get_attention_backend(name: str = "auto", **shape: int | None) -> Callable:
    """Return the paged-attention function for `name` ("auto" picks the fastest correct one here;
    `shape`: head_dim / page_size, see `resolve_backend`)."""
    module, attr = _BACKEND_FUNCTIONS[resolve_backend(name, **shape)]
    return getattr(importlib.import_module(module), attr)


def get_kv_writer(name: str = "auto", **shape: int | None) -> Callable:
    """Return the KV-write function (signature of `reference.write_kv`) of backend `name`: the
    backend module's own `write_kv` when it has one, else the plain-XLA scatter."""
    module, _ = _BACKEND_FUNCTIONS[resolve_backend(name, **shape)]
    return getattr(importlib.import_module(module), "write_kv", write_kv)


def get_fused_attention(name: str = "auto", **shape: int | None) -> Callable | None:
    """The backend's attention-with-KV-write function (`paged_attention_with_kv_write`: writes the
    step's K/V into the pool inside the kernel, then attends; returns (out, k_cache, v_cache)), or
    None when the backend writes with a separate `get_kv_writer` call."""
    module, _ = _BACKEND_FUNCTIONS[resolve_backend(name, **shape)]
    return getattr(importlib.import_module(module), "paged_attention_with_kv_write", None)


__all__ = [
    "BACKENDS",
    "AttentionMetadata",
    "empty_metadata",
    "gather_all_paged_attention",
    "get_attention_backend",
    "get_fused_attention",
    "get_kv_writer",
    "paged_attention",
    "resolve_backend",
    "write_kv",
]
