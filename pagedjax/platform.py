"""Platform probing, in one place: the backend, the CPU's features, what "auto" resolves to here
(dtype, attention backend, matmul backend), which CPU kernels run, and the compilation cache.

    python -c "import json, pagedjax.platform as p; print(json.dumps(p.describe(), indent=2))"

A leaf module: JAX and the kernel modules are imported inside the functions that need them, never at
import time (`cpu_features()` reads /proc/cpuinfo only), so the module itself is cheap to import
(`pagedjax/__init__.py`, run first, still imports the engine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pagedjax import envs

CPUINFO = "/proc/cpuinfo"

# name -> module of each CPU kernel (every one has is_available() and unavailable_reason()).
CPU_KERNELS = {
    "paged_attention": "pallas_kernels.cpu",
    "packed_matmul": "pallas_kernels.cpu.packed_matmul",
    "amx_matmul": "pallas_kernels.cpu.amx_matmul",
    "top_k": "pallas_kernels.cpu.top_k",
    "inverse_cdf": "pallas_kernels.cpu.inverse_cdf",
}


@dataclass(frozen=True)
class CpuFeatures:
    """What /proc/cpuinfo says about the first processor (x86 flag names; all False elsewhere)."""

    vendor: str = ""  # "GenuineIntel", "AuthenticAMD", ... ("" when unknown)
    model_name: str = ""
    avx512f: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    amx_tile: bool = False
    flags: frozenset[str] = field(default=frozenset(), repr=False)  # every flag ("Features" on Arm)

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def as_dict(self) -> dict[str, Any]:
        """The named fields (not the whole flag list)."""
        return {
            "vendor": self.vendor,
            "model_name": self.model_name,
            **{name: getattr(self, name) for name in _FLAG_FIELDS},
        }


_FLAG_FIELDS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def parse_cpuinfo(text: str) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (the first occurrence of each key counts: the
    file repeats them per processor)."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    flags = frozenset((info.get("flags") or info.get("Features") or "").split())
    return CpuFeatures(
        vendor=info.get("vendor_id", ""),
        model_name=info.get("model name", ""),
        flags=flags,
        **{name: name in flags for name in _FLAG_FIELDS},
    )


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CpuFeatures (read once; empty where /proc/cpuinfo cannot be read)."""
    try:
        with open(CPUINFO) as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuFeatures()


def _cpu_vendor() -> str:
    return cpu_features().vendor


def backend() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of JAX's first device."""
    import jax

    return jax.devices()[0].platform


def default_dtype() -> str:
    """bfloat16 where it is fast, else float32.

    Fast: accelerators, and CPUs where the packed bf16 matmul kernel (pallas_kernels.cpu.amx_matmul)
    beats the float32 one: with AMX tiles (several times the float32 rate), or with AVX-512 BF16 dot
    products on AMD Zen 4 (measured 1.9-2.2x the float32 kernel at 64-1,024 rows). Not on Intel CPUs
    with AVX-512 BF16 but no AMX: their VDPBF16PS measured at half the float32 FMA rate (README,
    2026-11-22). Without the kernel, XLA's own bf16 dot measured slower than float32 on every CPU
    tried here (it re-packs the weight on every call)."""
    if backend() != "cpu":
        return "bfloat16"
    from pallas_kernels.cpu import amx_matmul

    kernel = amx_matmul.kernel_name()
    if kernel == "amx" or (kernel == "avx512_bf16" and _cpu_vendor() == "AuthenticAMD"):
        return "bfloat16"
    return "float32"


def default_attention_backend(
    platform: str | None = None, *, head_dim: int | None = None, page_size: int | None = None
) -> str:
    """What attention_backend="auto" runs here (`pallas_kernels.resolve_backend`, which the model
    runner calls): GPU: "pallas" when head_dim / page_size suit Triton, else "xla"; TPU: "xla"; CPU:
    "cpu" when the compiled kernel builds and loads, else "xla"."""
    from pallas_kernels import resolve_backend

    return resolve_backend("auto", platform, head_dim=head_dim, page_size=page_size)


def matmul_kernel_module(dtype: Any):
    """The packed-weight CPU kernel module for weights of `dtype` (float32: packed_matmul, bfloat16:
    amx_matmul), or None when there is none for it."""
    import jax.numpy as jnp

    if jnp.dtype(dtype) == jnp.float32:
        from pallas_kernels.cpu import packed_matmul as kernel
    elif jnp.dtype(dtype) == jnp.bfloat16:
        from pallas_kernels.cpu import amx_matmul as kernel
    else:
        return None
    return kernel


def default_matmul_backend(dtype: Any = "float32", platform: str | None = None) -> str:
    """What matmul_backend="auto" runs for weights of `dtype` (the same rule as
    `pagedjax.models.layers.linear.resolve_matmul_backend`): "cpu" on the CPU platform when the
    packed-weight kernel for that dtype runs here, else "xla"."""
    kernel = matmul_kernel_module(dtype)
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform != "cpu" or kernel is None:
        return "xla"
    return "cpu" if kernel.is_available() else "xla"


def cpu_kernels() -> dict[str, dict[str, Any]]:
    """Each CPU kernel: {"available": bool, "unavailable_reason": str | None}. Builds (or loads
    from the kernel cache) every kernel on first call."""
    import importlib

    out: dict[str, dict[str, Any]] = {}
    for name, module in CPU_KERNELS.items():
        try:
            kernel = importlib.import_module(module)
            available = bool(kernel.is_available())
            reason = None if available else kernel.unavailable_reason()
        except Exception as e:  # a module that cannot even import (e.g. a jaxlib without jax.ffi)
            available, reason = False, f"import {module} failed: {e!r}"
        out[name] = {"available": available, "unavailable_reason": reason}
    if out["amx_matmul"]["available"]:
        from pallas_kernels.cpu import amx_matmul

        out["amx_matmul"]["path"] = amx_matmul.kernel_name()
    return out


def describe() -> dict[str, Any]:
    """A JSON-able summary of this platform: backend and devices, CPU features, the dtype and
    backends "auto" picks, each CPU kernel's availability (builds them on first call), and the
    PAGEDJAX_* variables set in the environment."""
    import os

    import jax

    devices = jax.devices()
    return {
        "backend": backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "cpu": cpu_features().as_dict(),
        "default_dtype": default_dtype(),
        "default_attention_backend": default_attention_backend(),
        "default_matmul_backend": {dt: default_matmul_backend(dt) for dt in ("float32", "bfloat16")},
        "cpu_kernels": cpu_kernels(),
        "env": {name: os.environ[name] for name, _, _ in envs.table() if name in os.environ},
    }


def enable_compilation_cache(path: str | None) -> None:
    """Persist compiled XLA programs across processes (~10x faster start-up the second time).

    `path`, else $PAGEDJAX_COMPILATION_CACHE, else ~/.cache/pagedjax/xla; '', 0, off or none: off."""
    import os

    import jax

    path = envs.compilation_cache_dir(path)
    if path is None:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


__all__ = [
    "CpuFeatures",
    "backend",
    "cpu_features",
    "cpu_kernels",
    "default_attention_backend",
    "default_dtype",
    "default_matmul_backend",
    "describe",
    "enable_compilation_cache",
    "matmul_kernel_module",
    "parse_cpuinfo",
]
