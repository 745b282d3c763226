"""The global KV page pool's bookkeeping: free pages, a reference count per page, and the prefix cache.

The pool's *memory* lives on the device (runner/kv_cache.py); this host-side object only decides
which page ids are in use. Reference counts let several sequences point at one physical page
(prefix sharing, parallel samples, beams); a page returns to the free list when its count hits 0.

Prefix caching: a *full* page can carry a content key (a hash chained over all tokens up to and
including the page, see kv_cache_manager.py). Keyed pages stay findable after their count drops to 0:
they sit on the free list with their contents intact and are reused by a later request with the same
prefix (`touch`), or evicted — least recently freed first — only when `allocate` finds no free page
without a cached prefix.

Placement: `allocate(n, after=p)` extends a sequence's pages with p + 1, p + 2, ... while those are
free and hold no cached prefix, and otherwise starts a new run in the middle of the longest run of
such pages (binary splitting, so that the runs already placed can keep growing). A sequence's K/V of
one layer and head then lie in a few long contiguous stretches of the pool instead of 2 KiB pieces
scattered over it, which the CPU's hardware prefetchers stream much faster: the decode attention is
a read of every context token's K/V in every step (measured: see README, "Measured 2026-12-03").
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class OutOfPagesError(RuntimeError):
    """Raised when more pages are requested than are free (callers check `num_free` first)."""


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.ref_counts = [0] * num_pages
        # Free pages in eviction order (front = evicted first). An OrderedDict gives O(1) removal
        # when a cached free page is reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.page_key: list[bytes | None] = [None] * num_pages
        self._cached: dict[bytes, int] = {}  # content key -> page
        self.num_evictions = 0
        # plain[p]: free and holding no cached prefix (placement takes these before evicting).
        self._plain = np.ones(num_pages, dtype=bool)

    @property
    def num_free(self) -> int:
        """Pages with no references (including cached ones, which are evictable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_cached(self) -> int:
        """Pages that hold a findable prefix (in use or free)."""
        return len(self._cached)

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """Take `n` free pages, each with reference count 1. All or nothing.

        Pages come in runs: after `after` (the sequence's last page) where possible, else from the
        middle of the longest run of free uncached pages; a cached free page is evicted (least
        recently freed first) only when no uncached one is left."""
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = []
        nxt = None if after is None else after + 1
        for _ in range(n):
            if nxt is None or nxt >= self.num_pages or not self._plain[nxt]:
                nxt = self._run_start()
            p = nxt if nxt is not None else next(iter(self._free))
            self._take(p)
            pages.append(p)
            nxt = p + 1
        return pages

    def _run_start(self) -> int | None:
        """Where a new run of pages starts: the middle of the longest run of free uncached pages (its
        first page when the run starts the pool), or None when there is no such page."""
        edges = np.diff(np.concatenate(([0], self._plain.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts) == 0:
            return None
        i = int(np.argmax(ends - starts))
        s, e = int(starts[i]), int(ends[i])
        return s if s == 0 else s + (e - s) // 2

    def _take(self, p: int) -> None:
        del self._free[p]
        self._plain[p] = False
        key = self.page_key[p]
        if key is not None:
            self.page_key[p] = None
            del self._cached[key]
            self.num_evictions += 1
        self.ref_counts[p] = 1

    def share(self, pages: list[int]) -> None:
        """Add one reference to each page (another sequence now reads it)."""
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} is free and cannot be shared")
            self.ref_counts[p] += 1

    def touch(self, pages: list[int]) -> None:
        """Add one reference to each cached page, taking free ones off the free list (a cache hit)."""
        for p in pages:
            if self.page_key[p] is None:
                raise ValueError(f"page {p} holds no cached prefix")
            if self.ref_counts[p] == 0:
                del self._free[p]
            self.ref_counts[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference from each page, in order; unreferenced pages join the back of the free
        list (so release a sequence's pages tail first: its last pages are evicted before its first)."""
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} released more often than it was taken")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self._free[p] = None
                self._plain[p] = self.page_key[p] is None

    # ------------------------------------------------------------------------------ prefix cache
    def lookup(self, key: bytes) -> int | None:
        return self._cached.get(key)

    def cache_page(self, page: int, key: bytes) -> None:
        """Make a full, in-use page findable under `key` (first writer wins on duplicates)."""
        if self.ref_counts[page] <= 0:
            raise ValueError(f"page {page} is free; only pages in use can be cached")
        if key in self._cached or self.page_key[page] is not None:
            return
        self._cached[key] = page
        self.page_key[page] = key

    def is_cached(self, page: int) -> bool:
        return self.page_key[page] is not None

    def reset_cache(self) -> int:
        """Forget every cached prefix (pages in use stay in use). Returns how many were dropped."""
        n = len(self._cached)
        self._cached.clear()
        self.page_key = [None] * self.num_pages
        self._plain = np.asarray(self.ref_counts) == 0
        return n

    def check_invariants(self) -> None:
        """Every page is either free (count 0, listed once) or in use (count > 0, not listed); the
        cache map and the per-page keys agree."""
        for p, c in enumerate(self.ref_counts):
            assert c >= 0, f"page {p} has negative ref count"
            assert (c == 0) == (p in self._free), f"page {p}: ref count {c} but free={p in self._free}"
        for key, p in self._cached.items():
            assert self.page_key[p] == key, f"page {p}: cache map and page key disagree"
        assert sum(k is not None for k in self.page_key) == len(self._cached), "stray page keys"
        for p in range(self.num_pages):
            plain = self.ref_counts[p] == 0 and self.page_key[p] is None
            assert bool(self._plain[p]) == plain, f"page {p}: plain flag {self._plain[p]}, expected {plain}"
