"""bfloat16 `x @ w` (float32 accumulation) over a weight packed once (C++, amx_matmul.cc): on Intel
AMX tiles, or with AVX-512 BF16 dot products on CPUs without AMX (AMD Zen 4, some Xeons).

Why: on CPUs with AMX, bf16 tile multiplies are ~16x the float32 FMA rate per core, but XLA:CPU's
bf16 dot re-packs the weight on every call and stays far from that at decode-sized row counts
(measured on this project's shapes: 70-300 GFLOP/s at 8-64 rows). Packing the weight once into the
tiles' pair layout and keeping 2 x 2 accumulator tiles busy is what `matmul_backend="cpu"` runs for
bfloat16 weights. Without AMX, VDPBF16PS takes the same pair layout (16 pairs per 64-byte panel row)
and doubles the float32 FMA rate while halving the weight bytes; there XLA's bf16 dot has no such
instruction path and measured slower than float32.

Built and cached like the other CPU kernels (`pallas_kernels.cpu`); `PAGEDJAX_CPU_AMX=0` disables
it; `PAGEDJAX_CPU_BF16_MATMUL=avx512` (or `force_dot_path(True)`) takes the AVX-512 BF16 path even
where AMX works; `kernel_name()` says which path runs. It is unavailable (and "auto" stays on XLA's
dot) where the CPU has neither. Usage::

    pw = pack_weight_bf16(w)       # w: [..., K, N] -> AmxPackedWeight (bf16 [..., NB, Kp / 2, 32])
    y = amx_matmul(x, pw)          # x: [M, K] (cast to bf16) -> f32 [M, N]

    pg = pack_weight_bf16(w_gate_up, swiglu=True)   # an MLP's [gate | up] weight, N = 2 F
    act = amx_matmul(x, pg)        # -> bf16 [M, F] = silu(x @ gate) * (x @ up), fused in the kernel
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
from pallas_kernels.cpu import envs

SOURCE = Path(__file__).with_name("amx_matmul.cc")
TARGET = "pagedjax_cpu_amx_matmul"
SYMBOL = "PagedJaxAmxMatmul"
SWIGLU_TARGET = "pagedjax_cpu_amx_matmul_swiglu"
SWIGLU_SYMBOL = "PagedJaxAmxMatmulSwiglu"
FLAGS = (*_cpu.FLAGS, "-mamx-tile", "-mamx-bf16")
PANEL = 16  # columns per packed panel (one AMX accumulator tile)
K_STEP = 32  # K is padded to a multiple of this (one bf16 A tile row)

_lock = threading.Lock()
_state: dict[str, object] = {}


@dataclass(frozen=True)
class AmxPackedWeight:
    """A [..., K, N] weight stored as bf16 [..., ceil(N / 16), Kp / 2, 32] (Kp = K rounded up to 32).

    Element [..., b, p, 2 c + e] = w[..., 2 p + e, 16 b + c]: per panel of 16 columns, pairs of
    consecutive K rows interleaved, which is the B-operand layout of AMX's TDPBF16PS.

    swiglu: the weight is an MLP's [gate | up] (N = 2 F, F a multiple of 16) with its panels
    interleaved (gate panel j at 2 j, up panel j at 2 j + 1); the kernel then returns the gated
    activation bf16 [M, F] instead of f32 [M, N]."""

    data: jax.Array
    k: int = field(metadata=dict(static=True))
    n: int = field(metadata=dict(static=True))
    swiglu: bool = field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape."""
        return (*self.data.shape[:-3], self.k, self.n)


jax.tree_util.register_dataclass(AmxPackedWeight, data_fields=["data"], meta_fields=["k", "n", "swiglu"])


def _padded_k(k: int) -> int:
    return -(-k // K_STEP) * K_STEP


def swiglu_packable(n: int) -> bool:
    """Whether a [gate | up] weight of N columns can be packed with swiglu=True."""
    return n % (2 * PANEL) == 0


def _swiglu_columns(n: int) -> np.ndarray:
    """Column order that puts gate panel j, then up panel j, side by side (N = 2 F)."""
    f = n // 2
    gate = np.arange(f).reshape(-1, PANEL)
    return np.stack([gate, gate + f], axis=1).reshape(-1)


def pack_weight_bf16(w: jax.Array, swiglu: bool = False) -> AmxPackedWeight:
    """[..., K, N] (any float dtype; rounded to bf16) -> AmxPackedWeight (see its docstring)."""
    w = jnp.asarray(w, jnp.bfloat16)
    *lead, k, n = w.shape
    if swiglu:
        if not swiglu_packable(n):
            raise ValueError(f"swiglu packing needs N = 2 F with F a multiple of {PANEL}, got N = {n}")
        w = w[..., _swiglu_columns(n)]
    kp, nb = _padded_k(k), -(-n // PANEL)
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, kp - k), (0, nb * PANEL - n)])
    w = w.reshape(*lead, kp // 2, 2, nb, PANEL)  # [..., p, e, b, c]
    nd = len(lead)
    w = jnp.transpose(w, (*range(nd), nd + 2, nd, nd + 3, nd + 1))  # [..., b, p, c, e]
    return AmxPackedWeight(w.reshape(*lead, nb, kp // 2, 2 * PANEL), k, n, swiglu)


def unpack_weight_bf16(pw: AmxPackedWeight) -> jax.Array:
    """Inverse of `pack_weight_bf16` (bf16 [..., K, N], columns in their original order)."""
    *lead, nb, half_k, _ = pw.data.shape
    nd = len(lead)
    w = pw.data.reshape(*lead, nb, half_k, PANEL, 2)  # [..., b, p, c, e]
    w = jnp.transpose(w, (*range(nd), nd + 1, nd + 3, nd, nd + 2))  # [..., p, e, b, c]
    w = w.reshape(*lead, 2 * half_k, nb * PANEL)[..., : pw.k, : pw.n]
    if pw.swiglu:
        w = w[..., np.argsort(_swiglu_columns(pw.n))]
    return w


KERNEL_NAMES = {2: "amx", 1: "avx512_bf16"}


def _load_checked():
    lib = _cpu.load(FLAGS, TARGET, source=SOURCE, symbol=SYMBOL)
    jax.ffi.register_ffi_target(SWIGLU_TARGET, jax.ffi.pycapsule(getattr(lib, SWIGLU_SYMBOL)), platform="cpu")
    if envs.bf16_matmul_forces_avx512():
        lib.pagedjax_cpu_bf16_matmul_force_dot(1)
    if not lib.pagedjax_cpu_bf16_matmul_kernel():
        raise RuntimeError("this CPU has neither AMX (amx_bf16, amx_tile, OS permission) nor AVX-512 BF16")
    return lib


def kernel_name() -> str | None:
    """The path calls take now: "amx" or "avx512_bf16" (None: the kernel is unavailable)."""
    if not is_available():
        return None
    return KERNEL_NAMES[_state["lib"].pagedjax_cpu_bf16_matmul_kernel()]


def force_dot_path(force: bool) -> None:
    """Take the AVX-512 BF16 path even where AMX works (tests of both paths, A/B runs); a compiled
    program picks the path at each call, so this applies to the next call."""
    _ensure_loaded()
    _state["lib"].pagedjax_cpu_bf16_matmul_force_dot(int(force))


# is_available(): the kernel builds (or is cached), loads, and this CPU runs AMX or AVX-512 BF16.
_kernel = _cpu.KernelLibrary(globals(), "CPU AMX matmul", "PAGEDJAX_CPU_AMX", _load_checked, logging.INFO)
_ensure_loaded = _kernel.ensure_loaded
is_available = _kernel.is_available
unavailable_reason = _kernel.unavailable_reason


def amx_matmul(
    x: jax.Array,
    w: AmxPackedWeight,
    layer: jax.Array | int | None = None,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """[M, K] @ packed [K, N] -> f32 [M, N]: x is rounded to bf16, products summed in float32.

    A swiglu weight returns bf16 [M, N / 2] = silu(x @ gate) * (x @ up) (computed in float32, then
    rounded). Same contract as `packed_matmul`: a stacked weight needs `layer` (read in place);
    `valid_rows` (i32[4]) limits the rows computed to [v0, v1) and [v2, v3), the others are zero."""
    _ensure_loaded()
    if w.data.ndim not in (3, 4):
        raise ValueError(f"packed weight data must be [NB, K/2, 32] or [L, NB, K/2, 32], got {w.data.shape}")
    if w.data.ndim == 4 and layer is None:
        raise ValueError("a stacked packed weight needs the layer index")
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}], got {x.shape}")
    x = jnp.asarray(x, jnp.bfloat16)
    kp = 2 * w.data.shape[-2]
    if kp != w.k:
        x = jnp.pad(x, ((0, 0), (0, kp - w.k)))
    if w.swiglu:
        call = jax.ffi.ffi_call(SWIGLU_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.n // 2), jnp.bfloat16))
    else:
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32))
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    m = x.shape[0]
    rows = jnp.asarray([0, m, m, m] if valid_rows is None else valid_rows, jnp.int32).reshape(4)
    return call(x, w.data, layer, rows, n=np.int64(w.n))


__all__ = [
    "AmxPackedWeight",
    "amx_matmul",
    "force_dot_path",
    "is_available",
    "kernel_name",
    "pack_weight_bf16",
    "swiglu_packable",
    "unavailable_reason",
    "unpack_weight_bf16",
]
