"""Paged attention as an XLA:CPU FFI custom call (C++, paged_attention.cc): reads the page pool in
place, with no gather copies, on all cores.

The kernel is compiled at first use with the system C++ compiler (`$CXX`, else g++ / c++ / clang++)
into a cache directory (`$PAGEDJAX_KERNEL_CACHE`, default ~/.cache/pagedjax/kernels), keyed by a hash
of the source (and the headers beside it), the flags, the JAX version and the CPU, and built
atomically (written to a temporary file, then renamed), so concurrent first uses are safe and later
processes load it in milliseconds.
If there is no compiler or the build fails, `is_available()` is False (the reason is logged once and
kept in `unavailable_reason()`) and the "auto" backend stays on plain XLA.

How it runs: work items of (query rows, KV head) are claimed dynamically by the calling thread and by
helpers scheduled on XLA's intra-op thread pool (the FFI `ThreadPool` context: 2 threads on a 2-core
machine); the caller spin-waits for the helpers' last items (wait_done.h) rather than sleeping at once.
A decode row's G query heads share every K/V row load (register-resident kernel for head_dim
64/128); prefill rows go in blocks of a few rows per item, computed as small GEMMs (K block
transposed once, broadcast-FMA scores, register-blocked P V). bf16 pools are read in place too (32 values
per load, split into even/odd lanes, with queries permuted to match).

Environment (every variable is listed in `pallas_kernels.cpu.envs`): `PAGEDJAX_CPU_KERNEL=0`
disables it; `PAGEDJAX_KERNEL_CACHE=DIR` moves the build cache; `PAGEDJAX_CPU_ATTN_THREADS=N` uses
at most N threads (1: the calling thread only); `PAGEDJAX_CPU_ATTN_GENERIC=1` forces the dot-product
block kernel for every row (tests, tuning); `PAGEDJAX_CPU_ATTN_DEBUG=1` prints the work split of
each call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import envs
from pallas_kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cc")
TARGET = "pagedjax_cpu_paged_attention"
SYMBOL = "PagedJaxPagedAttention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib" | "error" once tried


def _cache_dir() -> Path:
    return envs.kernel_cache_dir()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a cache shared between machines must not mix CPUs."""
    sig = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                sig += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return sig


def build(flags: tuple[str, ...] = FLAGS, *, cache_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile a kernel source (or find it in the cache); returns the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    src = source.read_bytes()
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    headers = b"".join(h.name.encode() + h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    for part in (
        src,
        headers,
        " ".join(flags).encode(),
        jax.__version__.encode(),
        cxx.encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    out_dir = cache_dir or _cache_dir()
    out = out_dir / f"{source.stem}-{key.hexdigest()[:20]}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [cxx, *flags, "-I", include, str(source), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        os.replace(tmp, out)  # atomic: readers see the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(
    flags: tuple[str, ...] = FLAGS,
    target: str = TARGET,
    *,
    cache_dir: Path | None = None,
    source: Path = SOURCE,
    symbol: str = SYMBOL,
) -> ctypes.CDLL:
    """Build (if needed), load and register a kernel's `symbol` under the FFI target name `target`."""
    lib = ctypes.cdll.LoadLibrary(str(build(flags, cache_dir=cache_dir, source=source)))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def load_once(
    state: dict,
    lock: threading.Lock,
    what: str,
    env_switch: str,
    loader: Callable[[], ctypes.CDLL],
    level: int = logging.WARNING,
) -> ctypes.CDLL:
    """Load a kernel library the first time (state["lib"]) or fail the same way every time.

    `env_switch=0` (a default-on switch of `envs`) disables it; any failure (no compiler, build
    error, bad jaxlib, a check in `loader`) is remembered in state["error"] and logged once, so
    callers fall back cleanly."""
    with lock:
        if "lib" in state:
            return state["lib"]
        if "error" in state:
            raise RuntimeError(state["error"])
        try:
            if not envs.switch_enabled(env_switch):
                raise RuntimeError(f"disabled by {env_switch}=0")
            state["lib"] = loader()
            return state["lib"]
        except Exception as e:
            state["error"] = f"{what} unavailable: {e}"
            log.log(level, "%s", state["error"])
            raise RuntimeError(state["error"]) from e


class KernelLibrary:
    """The load-once / `is_available` / `unavailable_reason` boilerplate of one kernel module.

    State lives in the module's own `_state` dict and `_lock` (looked up in `module_globals` at each
    call, so a test may swap `module._state`); a module binds the methods as its functions:

        _kernel = KernelLibrary(globals(), "CPU top-k kernel", "PAGEDJAX_CPU_TOPK", _load)
        _ensure_loaded = _kernel.ensure_loaded
        is_available = _kernel.is_available
        unavailable_reason = _kernel.unavailable_reason
    """

    def __init__(
        self,
        module_globals: dict,
        what: str,
        env_switch: str,
        loader: Callable[[], ctypes.CDLL],
        level: int = logging.INFO,
    ):
        envs.variable(env_switch)  # a switch must be documented in envs.VARIABLES
        self._globals = module_globals
        self.what = what
        self.env_switch = env_switch
        self.loader = loader
        self.level = level

    def ensure_loaded(self) -> ctypes.CDLL:
        """The loaded library; RuntimeError (the same every time) when it cannot load here."""
        g = self._globals
        return load_once(g["_state"], g["_lock"], self.what, self.env_switch, self.loader, self.level)

    def is_available(self) -> bool:
        """True when the kernel builds (or is cached) and loads here; builds it on first call."""
        try:
            self.ensure_loaded()
            return True
        except RuntimeError:
            return False

    def unavailable_reason(self) -> str | None:
        """None when available, else why not (tries the load first)."""
        return None if self.is_available() else str(self._globals["_state"].get("error"))


WRITE_TARGET = "pagedjax_cpu_paged_attention_write"
WRITE_SYMBOL = "PagedJaxPagedAttentionWrite"


def _load_attention() -> ctypes.CDLL:
    lib = load()
    jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(getattr(lib, WRITE_SYMBOL)), platform="cpu")
    return lib


_kernel = KernelLibrary(
    globals(), "CPU paged-attention kernel", "PAGEDJAX_CPU_KERNEL", _load_attention, logging.WARNING
)
_ensure_loaded = _kernel.ensure_loaded
is_available = _kernel.is_available
unavailable_reason = _kernel.unavailable_reason


def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    _target: str = TARGET,
    **ignored,
) -> jax.Array:
    """Same contract as `pallas_kernels.reference.paged_attention`: f32 [T, H, Dh], zero padding rows.

    Pools may be float32 or bfloat16 bits (uint16 / bfloat16); values are converted to f32 on load.
    """
    if _target == TARGET:
        _ensure_loaded()
    if k_cache.dtype not in (jnp.float32, jnp.uint16, jnp.bfloat16):
        raise TypeError(f"CPU kernel: unsupported pool dtype {k_cache.dtype}")
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    call = jax.ffi.ffi_call(_target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(
        jnp.asarray(q, jnp.float32),
        k_cache,
        v_cache,
        i32(layer).reshape(()),
        i32(meta.decode_block_tables),
        i32(meta.decode_context_lens),
        i32(meta.prefill_block_tables),
        i32(meta.prefill_context_lens),
        i32(meta.prefill_q_start),
        i32(meta.prefill_q_len),
        i32(meta.num_prefill_seqs).reshape(()),
        scale=np.float32(scale),
        sliding_window=np.int32(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )


def paged_attention_with_kv_write(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    meta: AttentionMetadata,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_pages: jax.Array,
    slot_offsets: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    **ignored,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`write_kv` then `paged_attention` in one custom call (the KV write fused into the kernel).

    Returns (out f32 [T, H, Dh], k_cache, v_cache); the pools are aliased in and out, so with donated
    (or scan-carried) pools the write is in place. Rows with `slot_pages` outside the pool are padding
    and are not written."""
    _ensure_loaded()
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    call = jax.ffi.ffi_call(
        WRITE_TARGET,
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ),
        input_output_aliases={1: 1, 2: 2},
    )
    return call(
        jnp.asarray(q, jnp.float32),
        k_cache,
        v_cache,
        i32(layer).reshape(()),
        i32(meta.decode_block_tables),
        i32(meta.decode_context_lens),
        i32(meta.prefill_block_tables),
        i32(meta.prefill_context_lens),
        i32(meta.prefill_q_start),
        i32(meta.prefill_q_len),
        i32(meta.num_prefill_seqs).reshape(()),
        jnp.asarray(k_new, jnp.float32),
        jnp.asarray(v_new, jnp.float32),
        i32(slot_pages),
        i32(slot_offsets),
        scale=np.float32(scale),
        sliding_window=np.int32(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )


__all__ = [
    "KernelLibrary",
    "build",
    "is_available",
    "load",
    "paged_attention",
    "paged_attention_with_kv_write",
    "unavailable_reason",
]
