"""Runs `spec_engine_cases.py` (speculation = no speculation through the real engine, for every
method) in a fresh interpreter.

Known problem (2026-12-07, jax 0.10.2, Intel Xeon with AMX): late in the full suite's process, an
XLA:CPU compile of one of these cases' sampler programs segfaults (inside `backend_compile_and_load`,
or in the persistent cache's serialization when that is on). The same cases pass alone, after
tests/entrypoints, and in a fresh process with the persistent cache on; the crash points at state
left by earlier tests in the process, not yet found. Until it is, the cases run in a subprocess
so a crash there cannot hide the rest of the suite — and would still fail this test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("spec_engine_cases.py")


def test_speculation_equals_no_speculation_in_a_fresh_process():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        capture_output=True,
        text=True,
        cwd=CASES.parents[2],
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
