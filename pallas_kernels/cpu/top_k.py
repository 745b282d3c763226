"""The k largest values of each row (C++, top_k.cc): the values of `lax.top_k(x, k)`, bit for bit.

Why: XLA:CPU's TopK partially sorts each row on one thread; the sampler asks for the 256 largest
logits of every row whenever a step has a top-k / top-p request, which took ~75 ms per 256-row step
on a 49k vocabulary. This kernel makes one vectorised pass per row against the smallest value kept
so far and shares the rows between the calling thread and XLA's intra-op pool.

Built and cached like the other CPU kernels (`pallas_kernels.cpu`); `PAGEDJAX_CPU_TOPK=0` disables
it. `top_k_values` falls back to `lax.top_k` where the kernel is unavailable or the backend is not
the CPU, so callers need not check."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import cpu as _cpu

SOURCE = Path(__file__).with_name("top_k.cc")
TARGET = "pagedjax_cpu_top_k_values"
SYMBOL = "PagedJaxTopKValues"

_lock = threading.Lock()
_state: dict[str, object] = {}


_kernel = _cpu.KernelLibrary(
    globals(),
    "CPU top-k kernel",
    "PAGEDJAX_CPU_TOPK",
    lambda: _cpu.load(target=TARGET, source=SOURCE, symbol=SYMBOL),
    logging.INFO,
)
_ensure_loaded = _kernel.ensure_loaded
is_available = _kernel.is_available
unavailable_reason = _kernel.unavailable_reason


def top_k_values(x: jax.Array, k: int) -> jax.Array:
    """f32 [S, V] -> the k largest values of each row, descending, f32 [S, k] (= `lax.top_k(x, k)[0]`)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [S, V], got {x.shape}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"need 1 <= k <= {x.shape[1]}, got k = {k}")
    x = jnp.asarray(x, jnp.float32)
    if jax.default_backend() != "cpu" or not is_available():
        return lax.top_k(x, k)[0]
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], k), jnp.float32))(x)


__all__ = ["is_available", "top_k_values", "unavailable_reason"]
