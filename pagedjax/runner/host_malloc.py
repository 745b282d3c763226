"""Keeps glibc's malloc from handing XLA:CPU fresh pages for every large buffer.

glibc serves any allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and gives
it back with `munmap` when freed, so a step output of that size -- the float32 logits of the LM
head at ~170 or more rows of a 49k vocabulary -- page-faults in (and the kernel zeroes) every one
of its 4 KiB pages on every step. On the 2-core AMX VM of 2026-12-03 that made the LM head matmul
3x slower past 32 MiB of output (SmolLM2, 192 rows: 22.1 ms vs 7.2 ms once the buffer is reused)
and a jitted 64 MiB fill run at 4.8 GB/s against 14 GB/s. With mmap off and a high trim threshold,
large buffers come from the heap and are reused from step to step (the cost: freed memory is kept
by the process instead of returned to the OS).

Applied once per process by the engine on the CPU backend; `PAGEDJAX_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from pagedjax import envs

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_state: dict[str, bool] = {}


def tune_host_malloc() -> bool:
    """mallopt(M_MMAP_MAX, 0) and a 1 GiB trim threshold, on glibc Linux; True if applied."""
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if sys.platform.startswith("linux") and envs.malloc_tuning():
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    _state["applied"] = applied
    return applied
