"""Platform probing (placeholder: being filled in by the platform work; see issue 20)."""

from __future__ import annotations


def default_dtype() -> str:
    """bfloat16 where it is fast, else float32.

    Fast: accelerators, and CPUs where the packed bf16 matmul kernel (pallas_kernels.cpu.amx_matmul)
    beats the float32 one: with AMX tiles (several times the float32 rate), or with AVX-512 BF16 dot
    products on AMD Zen 4 (measured 1.9-2.2x the float32 kernel at 64-1,024 rows). Not on Intel CPUs
    with AVX-512 BF16 but no AMX: their VDPBF16PS measured at half the float32 FMA rate (README,
    2026-11-22). Without the kernel, XLA's own bf16 dot measured slower than float32 on every CPU
    tried here (it re-packs the weight on every call)."""
    import jax

    if jax.devices()[0].platform != "cpu":
        return "bfloat16"
    from pallas_kernels.cpu import amx_matmul

    kernel = amx_matmul.kernel_name()
    if kernel == "amx" or (kernel == "avx512_bf16" and _cpu_vendor() == "AuthenticAMD"):
        return "bfloat16"
    return "float32"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def enable_compilation_cache(path: str | None) -> None:
    """Persist compiled XLA programs across processes (~10x faster start-up the second time)."""
    import os

    import jax

    path = path or os.environ.get("PAGEDJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/pagedjax/xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
