"""float32 `x @ w` over a weight packed once into 64-column panels (C++, matmul.cc), for XLA:CPU.

Why: XLA:CPU's dot re-packs the weight on every call (a transpose pass over all weights each
engine step) and uses only about half of the FMA peak at the 32-64 rows of a decode step. Packing
once at load time and streaming the panels through a register-blocked AVX-512 micro-kernel measured
~1.2-1.5x XLA's dot on this project's matmul shapes (experiments/bench_matmul.py).

Built and cached like the attention kernel (see `pallas_kernels.cpu`); `PAGEDJAX_CPU_MATMUL=0`
disables it. Usage::

    pw = pack_weight(w)            # w: f32 [..., K, N] -> PackedWeight (data f32 [..., NB, K, 64])
    y = packed_matmul(x, pw)       # x: f32 [M, K] -> f32 [M, N]; works under jit, scan, vmap-free

`PackedWeight` is a pytree (the panel array is its leaf, N is static), so stacked per-layer weights
[L, K, N] pack to [L, NB, K, 64] and `lax.scan` slices them like any other parameter.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu as _cpu

SOURCE = Path(__file__).with_name("matmul.cc")
TARGET = "pagedjax_cpu_packed_matmul"
SYMBOL = "PagedJaxPackedMatmul"
PANEL = 64  # columns per packed panel (matmul.cc's NR)

_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(frozen=True)
class PackedWeight:
    """A [..., K, N] weight stored as [..., ceil(N / 64), K, 64] column panels (zero padded)."""

    data: jax.Array
    n: int = field(metadata=dict(static=True))

    @property
    def k(self) -> int:
        return self.data.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape."""
        return (*self.data.shape[:-3], self.k, self.n)


jax.tree_util.register_dataclass(PackedWeight, data_fields=["data"], meta_fields=["n"])


def pack_weight(w: jax.Array) -> PackedWeight:
    """[..., K, N] float32 -> PackedWeight; element [..., b, k, c] = w[..., k, 64 b + c]."""
    w = jnp.asarray(w, jnp.float32)
    *lead, k, n = w.shape
    nb = -(-n // PANEL)
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, nb * PANEL - n)])
    w = w.reshape(*lead, k, nb, PANEL)
    return PackedWeight(jnp.moveaxis(w, -2, -3), n)


def unpack_weight(pw: PackedWeight) -> jax.Array:
    """Inverse of `pack_weight`."""
    w = jnp.moveaxis(pw.data, -3, -2)  # [..., K, NB, 64]
    return w.reshape(*w.shape[:-2], -1)[..., : pw.n]


def _load_checked():
    lib = _cpu.load(target=TARGET, source=SOURCE, symbol=SYMBOL)
    if not lib.pagedjax_cpu_matmul_has_avx512():
        raise RuntimeError("built without AVX-512: XLA's dot is faster than the portable loop")
    return lib


# is_available(): the kernel builds (or is cached), loads and has its AVX-512 path here.
_kernel = _cpu.KernelLibrary(
    globals(), "CPU packed matmul", "PAGEDJAX_CPU_MATMUL", _load_checked, logging.INFO
)
_ensure_loaded = _kernel.ensure_loaded
is_available = _kernel.is_available
unavailable_reason = _kernel.unavailable_reason


def packed_matmul(
    x: jax.Array,
    w: PackedWeight,
    layer: jax.Array | int | None = None,
    valid_rows: jax.Array | None = None,
    *,
    _target: str = TARGET,
) -> jax.Array:
    """f32 [M, K] @ packed [K, N] -> f32 [M, N] (float32 FMA accumulation).

    A stacked weight (data [L, NB, K, 64]) needs `layer` (a traced scalar is fine): the kernel reads
    that layer in place, where slicing it out first would make XLA copy it on every call.
    `valid_rows` (i32[4], may be traced): only rows in [v0, v1) and [v2, v3) are computed, the rest
    are zero (padding rows of a bucketed step); default: all rows."""
    if _target == TARGET:
        _ensure_loaded()
    if w.data.ndim not in (3, 4):
        raise ValueError(f"packed weight data must be [NB, K, 64] or [L, NB, K, 64], got {w.data.shape}")
    if w.data.ndim == 4 and layer is None:
        raise ValueError("a stacked packed weight needs the layer index")
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}], got {x.shape}")
    call = jax.ffi.ffi_call(_target, jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32))
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    m = x.shape[0]
    rows = jnp.asarray([0, m, m, m] if valid_rows is None else valid_rows, jnp.int32).reshape(4)
    return call(jnp.asarray(x, jnp.float32), w.data, layer, rows, n=np.int64(w.n))


__all__ = [
    "PackedWeight",
    "is_available",
    "pack_weight",
    "packed_matmul",
    "unavailable_reason",
    "unpack_weight",
]
