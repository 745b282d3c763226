"""runner/host_malloc.py: after tuning, glibc serves large buffers from the heap (no fresh mmap)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc is Linux-only")

PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from pagedjax.runner.host_malloc import tune_host_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def mmapped_by_big_malloc():
        n0 = libc.mallinfo2().hblks
        p = libc.malloc(48 << 20)  # above glibc's largest mmap threshold (32 MiB)
        n = libc.mallinfo2().hblks - n0
        libc.free(p)
        return n

    before = mmapped_by_big_malloc()
    applied = tune_host_malloc()
    after = mmapped_by_big_malloc()
    print(before, applied, after, tune_host_malloc())
    """
)


def _probe(env_extra: dict[str, str]) -> list[str]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_tuning_stops_mmap_for_large_buffers():
    try:
        before, applied, after, again = _probe({"PAGEDJAX_MALLOC_TUNING": "1"})
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("not glibc >= 2.33")
        raise
    assert int(before) == 1, "a 48 MiB malloc should be mmapped by default"
    assert applied == "True" and again == "True"
    assert int(after) == 0, "after tuning, a 48 MiB malloc should come from the heap"


def test_tuning_can_be_switched_off():
    before, applied, after, _ = _probe({"PAGEDJAX_MALLOC_TUNING": "0"})
    assert applied == "False"
    assert int(after) == 1
