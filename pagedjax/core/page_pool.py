"""The global KV page pool's bookkeeping: a free list and a reference count per page.

The pool's *memory* lives on the device (runner/kv_cache.py); this host-side object only decides
which page ids are in use. Reference counts let several sequences point at one physical page
(prefix sharing, parallel samples, beams); a page returns to the free list when its count hits 0.
"""

from __future__ import annotations

from collections import deque


class OutOfPagesError(RuntimeError):
    """Raised when more pages are requested than are free (callers check `num_free` first)."""


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages, each with reference count 1. All or nothing."""
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self.ref_counts[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Add one reference to each page (another sequence now reads it)."""
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} is free and cannot be shared")
            self.ref_counts[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages nobody references go back to the free list."""
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} released more often than it was taken")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self._free.append(p)

    def check_invariants(self) -> None:
        """Every page is either free (count 0, listed once) or in use (count > 0, not listed)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for p, c in enumerate(self.ref_counts):
            assert c >= 0, f"page {p} has negative ref count"
            assert (c == 0) == (p in free), f"page {p}: ref count {c} but free={p in free}"
