"""Per-sequence block tables over the page pool: which pages hold which tokens of each sequence.

Token `i` of a sequence lives in page `block_table[i // block_size]` at offset `i % block_size`
(its "slot"). Pages are added as a sequence grows, never moved, and all released at once when it
finishes or is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedjax.core.page_pool import PagePool


@dataclass
class KVCacheStats:
    num_pages: int
    pages_used: int
    pages_free: int
    allocated_slots: int
    filled_slots: int

    @property
    def usage(self) -> float:
        return self.pages_used / self.num_pages

    @property
    def waste(self) -> float:
        """Allocated-but-unfilled token slots / allocated slots (internal fragmentation)."""
        return 0.0 if self.allocated_slots == 0 else 1.0 - self.filled_slots / self.allocated_slots


class KVCacheManager:
    def __init__(self, num_pages: int, block_size: int):
        self.pool = PagePool(num_pages)
        self.block_size = block_size
        self.block_tables: dict[str, list[int]] = {}
        self._filled: dict[str, int] = {}  # tokens whose K/V are in the pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make the sequence's table cover `num_tokens` tokens. False (and no change) if the pool
        has too few free pages."""
        table = self.block_tables.setdefault(seq_id, [])
        extra = self.pages_needed(num_tokens) - len(table)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            if not table:
                del self.block_tables[seq_id]
            return False
        table.extend(self.pool.allocate(extra))
        self._filled.setdefault(seq_id, 0)
        return True

    def mark_filled(self, seq_id: str, num_tokens: int) -> None:
        """Record that the first `num_tokens` slots now hold K/V (for the waste statistic)."""
        self._filled[seq_id] = num_tokens

    def free(self, seq_id: str) -> None:
        table = self.block_tables.pop(seq_id, None)
        self._filled.pop(seq_id, None)
        if table:
            self.pool.release(table)

    def slots(self, seq_id: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(page ids, offsets) of tokens [start, end) of the sequence."""
        table = np.asarray(self.block_tables[seq_id], dtype=np.int32)
        pos = np.arange(start, end, dtype=np.int32)
        return table[pos // self.block_size], pos % self.block_size

    def stats(self) -> KVCacheStats:
        allocated = sum(len(t) for t in self.block_tables.values()) * self.block_size
        return KVCacheStats(
            num_pages=self.pool.num_pages,
            pages_used=self.pool.num_used,
            pages_free=self.pool.num_free,
            allocated_slots=allocated,
            filled_slots=sum(self._filled.values()),
        )

    def check_invariants(self) -> None:
        """No page owned twice, ref counts equal the number of tables holding each page."""
        self.pool.check_invariants()
        owners = [0] * self.pool.num_pages
        for table in self.block_tables.values():
            for p in table:
                owners[p] += 1
        for p, n in enumerate(owners):
            assert n == self.pool.ref_counts[p], (
                f"page {p}: {n} owners but ref count {self.pool.ref_counts[p]}"
            )
