"""Environment variables of the CPU kernels: one table (name, default, meaning) and typed accessors.

The kernel modules read every variable through this module (the C++ sources read theirs themselves,
with `std::getenv`, and are documented here too). `pagedjax.envs` re-exports this table beside the
engine's own variables; this module must not import pagedjax (pallas_kernels stands alone), and it
imports nothing heavy, so reading it costs nothing.

Accessors read the environment at each call (nothing is cached here); the kernels themselves load
once per process, so a switch changed after the first use of a kernel takes effect in the next
process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OFF_VALUES = ("0", "false", "off")  # what turns a default-on kernel switch off


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str  # as it would be written in the environment; "(unset)" where absence is the default
    help: str
    read_in: str = "python"  # "python", or the C++ source that reads it with std::getenv

    def get(self) -> str | None:
        """The raw value (None when unset)."""
        return os.environ.get(self.name)


CPU_KERNEL = EnvVar(
    "PAGEDJAX_CPU_KERNEL",
    "1",
    "0 / false / off: do not build or load the CPU paged-attention kernel (attention 'auto' stays on "
    "plain XLA; attention_backend='cpu' fails)",
)
KERNEL_CACHE = EnvVar(
    "PAGEDJAX_KERNEL_CACHE",
    "~/.cache/pagedjax/kernels",
    "folder of the compiled CPU kernel libraries (keyed by source, flags, JAX version and CPU)",
)
CPU_MATMUL = EnvVar(
    "PAGEDJAX_CPU_MATMUL",
    "1",
    "0 / false / off: disable the float32 packed-weight AVX-512 matmul kernel (matmul 'auto' stays on "
    "XLA's dot for float32 weights)",
)
CPU_AMX = EnvVar(
    "PAGEDJAX_CPU_AMX",
    "1",
    "0 / false / off: disable the bfloat16 packed-weight matmul kernel (AMX / AVX-512 BF16); also makes "
    "the CPU default dtype float32",
)
CPU_BF16_MATMUL = EnvVar(
    "PAGEDJAX_CPU_BF16_MATMUL",
    "auto",
    "avx512: the bfloat16 matmul kernel takes its AVX-512 BF16 path even where AMX works; auto: AMX "
    "where it works",
)
CPU_TOPK = EnvVar(
    "PAGEDJAX_CPU_TOPK",
    "1",
    "0 / false / off: disable the CPU top-k kernel (the sampler uses lax.top_k)",
)
CPU_SAMPLER = EnvVar(
    "PAGEDJAX_CPU_SAMPLER",
    "1",
    "0 / false / off: disable the CPU inverse-CDF sampling kernel (the sampler keeps its XLA version)",
)
CPU_ATTN_THREADS = EnvVar(
    "PAGEDJAX_CPU_ATTN_THREADS",
    "(unset)",
    "N: the CPU attention kernel uses at most N threads (1: the calling thread only); unset: the "
    "calling thread plus XLA's intra-op pool",
    read_in="pallas_kernels/cpu/paged_attention.cc",
)
CPU_ATTN_GENERIC = EnvVar(
    "PAGEDJAX_CPU_ATTN_GENERIC",
    "(unset)",
    "set (to any value, even 0): the CPU attention kernel uses its dot-product block kernel for every "
    "row (tests, tuning)",
    read_in="pallas_kernels/cpu/paged_attention.cc",
)
CPU_ATTN_DEBUG = EnvVar(
    "PAGEDJAX_CPU_ATTN_DEBUG",
    "(unset)",
    "set (to any value, even 0): the CPU attention kernel prints the work split of each call to stderr "
    "(read once per process)",
    read_in="pallas_kernels/cpu/paged_attention.cc",
)

VARIABLES: tuple[EnvVar, ...] = (
    CPU_KERNEL,
    KERNEL_CACHE,
    CPU_MATMUL,
    CPU_AMX,
    CPU_BF16_MATMUL,
    CPU_TOPK,
    CPU_SAMPLER,
    CPU_ATTN_THREADS,
    CPU_ATTN_GENERIC,
    CPU_ATTN_DEBUG,
)
_BY_NAME = {v.name: v for v in VARIABLES}


def variable(name: str) -> EnvVar:
    """The documented variable `name` (KeyError for an undocumented one: add it to VARIABLES)."""
    return _BY_NAME[name]


def switch_enabled(name: str) -> bool:
    """A default-on kernel switch (PAGEDJAX_CPU_KERNEL, _MATMUL, _AMX, _TOPK, _SAMPLER): False when
    set to 0, false or off."""
    value = variable(name).get()
    return value is None or value.strip().lower() not in OFF_VALUES


def kernel_cache_dir() -> Path:
    """Where compiled kernel libraries are cached ($PAGEDJAX_KERNEL_CACHE, else ~/.cache/...)."""
    env = KERNEL_CACHE.get()
    return Path(env) if env else Path.home() / ".cache" / "pagedjax" / "kernels"


def bf16_matmul_forces_avx512() -> bool:
    """PAGEDJAX_CPU_BF16_MATMUL=avx512: take the AVX-512 BF16 path even where AMX works."""
    return (CPU_BF16_MATMUL.get() or CPU_BF16_MATMUL.default) == "avx512"


def cpu_attn_threads() -> int | None:
    """PAGEDJAX_CPU_ATTN_THREADS as the C++ kernel reads it (atoi; None when unset). For reporting:
    the kernel reads the variable itself at each call."""
    value = CPU_ATTN_THREADS.get()
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return 0  # atoi of a non-number


def table() -> list[tuple[str, str, str]]:
    """(name, default, help) of every variable, for docs (variables read in C++ say so in help)."""
    return [
        (v.name, v.default, v.help if v.read_in == "python" else f"{v.help} [read in {v.read_in}]")
        for v in VARIABLES
    ]


__all__ = [
    "VARIABLES",
    "EnvVar",
    "bf16_matmul_forces_avx512",
    "cpu_attn_threads",
    "kernel_cache_dir",
    "switch_enabled",
    "table",
    "variable",
]
