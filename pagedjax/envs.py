"""Every PAGEDJAX_* environment variable, in one place: name, default, meaning, typed accessors.

pagedjax code reads its variables through the accessors below. The CPU kernels' variables live in
`pallas_kernels.cpu.envs` (pallas_kernels must not import pagedjax); `table()` lists both, and
`tests/test_platform.py` fails when a PAGEDJAX_* name in pagedjax/ or pallas_kernels/ (Python, C++)
is missing from it.

This module is a leaf: it imports nothing from pagedjax, and the kernels' table only inside
`table()` / `kernel_variables()` (importing `pallas_kernels.cpu` loads JAX), so the module itself is
cheap to import (`pagedjax/__init__.py`, run first, still imports the engine).

    python -c "from pagedjax import envs; print(envs.markdown_table())"
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_OFF_PATHS = ("", "0", "off", "none")


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str
    read_in: str = "python"

    def get(self) -> str | None:
        """The raw value (None when unset)."""
        return os.environ.get(self.name)


COMPILATION_CACHE = EnvVar(
    "PAGEDJAX_COMPILATION_CACHE",
    "~/.cache/pagedjax/xla",
    "folder of JAX's persistent compilation cache (when compilation_cache_dir is not given); "
    "'', 0, off or none: no persistent cache",
)
MALLOC_TUNING = EnvVar(
    "PAGEDJAX_MALLOC_TUNING",
    "1",
    "0: do not tune glibc malloc on the CPU backend (by default large buffers come from the heap and "
    "are reused instead of mmap'ed fresh each step; pagedjax/runner/host_malloc.py)",
)

VARIABLES: tuple[EnvVar, ...] = (COMPILATION_CACHE, MALLOC_TUNING)


def compilation_cache_dir(path: str | None = None) -> str | None:
    """The persistent compilation cache folder: `path` if given, else $PAGEDJAX_COMPILATION_CACHE,
    else ~/.cache/pagedjax/xla; None when that is '', 0, off or none (any case)."""
    path = path or os.environ.get(COMPILATION_CACHE.name, os.path.expanduser(COMPILATION_CACHE.default))
    return None if path.lower() in _OFF_PATHS else path


def malloc_tuning() -> bool:
    """False when PAGEDJAX_MALLOC_TUNING=0 (only "0" turns it off)."""
    return os.environ.get(MALLOC_TUNING.name, MALLOC_TUNING.default) != "0"


def kernel_variables():
    """The CPU kernels' variables (`pallas_kernels.cpu.envs.VARIABLES`; imports pallas_kernels.cpu)."""
    from pallas_kernels.cpu import envs as kernel_envs

    return kernel_envs.VARIABLES


def table() -> list[tuple[str, str, str]]:
    """(name, default, help) of every PAGEDJAX_* variable: pagedjax's, then the CPU kernels'.
    Variables read in C++ say where in their help."""
    from pallas_kernels.cpu import envs as kernel_envs

    return [(v.name, v.default, v.help) for v in VARIABLES] + kernel_envs.table()


def markdown_table() -> str:
    """`table()` as a Markdown table (for the README)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | `{default}` | {help_} |" for name, default, help_ in table()]
    return "\n".join(rows)


__all__ = [
    "VARIABLES",
    "EnvVar",
    "compilation_cache_dir",
    "kernel_variables",
    "malloc_tuning",
    "markdown_table",
    "table",
]
