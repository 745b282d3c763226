"""One draw per row from softmax(logits / T) restricted to logits / T >= thr, at quantile u (C++,
inverse_cdf.cc).

Why: the sampler's random rows (any temperature > 0) otherwise make several XLA passes over the
[rows, vocab] logits every step (~12 ms per 128-row step on a 49k vocabulary); the kernel handles each
row on one core in passes that stay in its L2, rows on all cores. Same contract as
`pagedjax.sampling.sampler._inverse_cdf` applied to x = logits / T (an IEEE division, as XLA's, so
thresholds XLA computed on x compare exactly; thr NaN keeps only the row maximum: a greedy row). Kept
tokens are x >= thr (and > -inf); u = 0 gives the first kept token; masses are summed in double, so a
draw can differ from the XLA version's only where u falls within rounding of a boundary between two
tokens.

Built and cached like the other CPU kernels (`pallas_kernels.cpu`); `PAGEDJAX_CPU_SAMPLER=0` disables
it (`is_available()` is then False and the sampler keeps its XLA version)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import cpu as _cpu

SOURCE = Path(__file__).with_name("inverse_cdf.cc")
TARGET = "pagedjax_cpu_inverse_cdf"
SYMBOL = "PagedJaxInverseCdf"

_lock = threading.Lock()
_state: dict[str, object] = {}


_kernel = _cpu.KernelLibrary(
    globals(),
    "CPU inverse-CDF sampling kernel",
    "PAGEDJAX_CPU_SAMPLER",
    lambda: _cpu.load(target=TARGET, source=SOURCE, symbol=SYMBOL),
    logging.INFO,
)
_ensure_loaded = _kernel.ensure_loaded


def is_available() -> bool:
    """True on the CPU backend when the kernel builds (or is cached) and loads here."""
    return jax.default_backend() == "cpu" and _kernel.is_available()


def unavailable_reason() -> str | None:
    if jax.default_backend() != "cpu":
        return f"the CPU kernel does not run on the {jax.default_backend()} backend"
    return _kernel.unavailable_reason()


def inverse_cdf(logits: jax.Array, temperature: jax.Array, thr: jax.Array, u: jax.Array) -> jax.Array:
    """logits f32 [S, V], temperature / thr / u f32 [S] -> i32 [S]: per row, the token at quantile u
    of softmax(logits / T) over the tokens with logits / T >= thr (thr NaN: only the maximum). Call
    only where `is_available()`."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [S, V], got {logits.shape}")
    _ensure_loaded()
    s = logits.shape[0]
    f32 = lambda a: jnp.asarray(a, jnp.float32).reshape(s)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((s,), jnp.int32))
    return call(jnp.asarray(logits, jnp.float32), f32(temperature), f32(thr), f32(u))


__all__ = ["inverse_cdf", "is_available", "unavailable_reason"]
