"""Per-sequence block tables over the page pool: which pages hold which tokens of each sequence.

Token `i` of a sequence lives in page `block_table[i // block_size]` at offset `i % block_size`
(its "slot"). Pages are added as a sequence grows, never moved, and released when it finishes or is
preempted.

Sharing (all through the pool's reference counts):
- Prefix caching: each full page gets a key chained from its parent page's key, its token ids and
  the request's extra key (cache salt / adapter). A new sequence adopts every cached page of its
  prompt's key chain (`adopt_cached_prefix`) and computes only the rest.
- Forks (parallel samples, beams): a new sequence shares all of another's pages (`fork`).
- Copy-on-write: before a sequence writes into a page that someone else also references, it gets a
  private copy (`allocate_slots` queues the (src, dst) page copy for the runner). Full, cached pages
  are never written: writes only ever go to slots past a sequence's computed tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pagedjax.core.page_pool import PagePool
from pagedjax.metrics import KVCacheStats


def page_key(parent: bytes, token_ids: Sequence[int], extra_key: bytes = b"") -> bytes:
    """Content key of one full page: a hash over the parent page's key, the salt and the tokens, so
    equal keys mean equal whole prefixes (not just equal pages)."""
    h = hashlib.sha256(parent)
    h.update(len(extra_key).to_bytes(4, "little"))
    h.update(extra_key)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_pages: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = PagePool(num_pages)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self._filled: dict[str, int] = {}  # tokens whose K/V are in the pages
        self._keys: dict[str, list[bytes]] = {}  # keys of the sequence's full pages so far
        self._extra: dict[str, bytes] = {}
        # Page copies (src, dst) the runner must do before the next step's writes (copy-on-write).
        self.pending_copies: list[tuple[int, int]] = []
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------ prefix cache
    def adopt_cached_prefix(self, seq_id: str, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
        """Start a sequence that holds no pages with every cached page of its prefix. Returns the
        number of tokens whose K/V are thereby already computed (a multiple of block_size, always
        leaving at least the last token to compute, since its logits are needed)."""
        assert seq_id not in self.block_tables, f"{seq_id} already holds pages"
        self._extra[seq_id] = extra_key
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        pages: list[int] = []
        keys: list[bytes] = []
        parent = b""
        for i in range((len(token_ids) - 1) // bs):
            key = page_key(parent, token_ids[i * bs : (i + 1) * bs], extra_key)
            page = self.pool.lookup(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = key
        if pages:
            self.pool.touch(pages)
            self.block_tables[seq_id] = pages
            self._keys[seq_id] = keys
            self._filled[seq_id] = len(pages) * bs
        return len(pages) * bs

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (for the hit-rate metrics)."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_hit_tokens

    def cache_full_pages(self, seq_id: str, num_computed: int, token_ids: Sequence[int]) -> None:
        """Make the sequence's pages that are now full findable by later requests."""
        if not self.enable_prefix_caching or seq_id not in self.block_tables:
            return
        bs = self.block_size
        keys = self._keys.setdefault(seq_id, [])
        table = self.block_tables[seq_id]
        extra = self._extra.get(seq_id, b"")
        for i in range(len(keys), min(num_computed // bs, len(table))):
            key = page_key(keys[-1] if keys else b"", token_ids[i * bs : (i + 1) * bs], extra)
            self.pool.cache_page(table[i], key)
            keys.append(key)

    def reset_prefix_cache(self) -> int:
        """Forget all cached prefixes (running sequences keep their pages). Returns pages dropped."""
        for keys in self._keys.values():
            keys.clear()
        self._keys.clear()
        return self.pool.reset_cache()

    # ------------------------------------------------------------------------------ allocation
    def allocate_slots(self, seq_id: str, num_tokens: int, write_from: int | None = None) -> bool:
        """Make the sequence's table cover `num_tokens` tokens and make the pages it will write
        (slots from `write_from` on) its own, copying shared ones. False, with no change, if the
        pool has too few free pages."""
        table = self.block_tables.get(seq_id, [])
        extra = self.pages_needed(num_tokens) - len(table)
        shared = []
        if write_from is not None:
            first = write_from // self.block_size
            shared = [i for i in range(first, len(table)) if self.pool.ref_counts[table[i]] > 1]
        if max(extra, 0) + len(shared) > self.pool.num_free:
            return False
        if seq_id not in self.block_tables:
            self.block_tables[seq_id] = table
            self._filled.setdefault(seq_id, 0)
        for i in shared:  # copy-on-write
            (new,) = self.pool.allocate(1, after=table[i - 1] if i > 0 else None)
            self.pending_copies.append((table[i], new))
            self.pool.release([table[i]])
            table[i] = new
        if extra > 0:
            table.extend(self.pool.allocate(extra, after=table[-1] if table else None))
        if write_from is not None:
            for p in table[write_from // self.block_size :]:
                assert self.pool.ref_counts[p] == 1 and not self.pool.is_cached(p), (
                    f"{seq_id} would write into shared or cached page {p}"
                )
        return True

    def fork(self, src_id: str, dst_id: str) -> None:
        """Let `dst_id` share every page of `src_id` (its K/V up to src's filled tokens)."""
        assert dst_id not in self.block_tables, f"{dst_id} already holds pages"
        table = list(self.block_tables.get(src_id, []))
        self.pool.share(table)
        self.block_tables[dst_id] = table
        self._filled[dst_id] = self._filled.get(src_id, 0)
        self._keys[dst_id] = list(self._keys.get(src_id, []))
        self._extra[dst_id] = self._extra.get(src_id, b"")

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def mark_filled(self, seq_id: str, num_tokens: int) -> None:
        """Record that the first `num_tokens` slots now hold K/V (for the waste statistic)."""
        if seq_id in self.block_tables:
            self._filled[seq_id] = num_tokens

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep only the pages that hold the first `num_tokens` tokens (speculative decoding rolls
        back the slots of rejected draft tokens). Full pages past the cut lose their cache keys."""
        table = self.block_tables.get(seq_id)
        if table is None:
            return
        keep = self.pages_needed(num_tokens)
        if keep < len(table):
            tail = table[keep:]
            del table[keep:]
            self.pool.release(tail[::-1])
        keys = self._keys.get(seq_id)
        if keys is not None and len(keys) > num_tokens // self.block_size:
            del keys[num_tokens // self.block_size :]
        if self._filled.get(seq_id, 0) > num_tokens:
            self._filled[seq_id] = num_tokens

    def free(self, seq_id: str) -> None:
        table = self.block_tables.pop(seq_id, None)
        self._filled.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        self._extra.pop(seq_id, None)
        if table:
            self.pool.release(table[::-1])

    def slots(self, seq_id: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(page ids, offsets) of tokens [start, end) of the sequence."""
        table = np.asarray(self.block_tables[seq_id], dtype=np.int32)
        pos = np.arange(start, end, dtype=np.int32)
        return table[pos // self.block_size], pos % self.block_size

    def stats(self) -> KVCacheStats:
        """Slot statistics count each physical page once, however many sequences share it.

        Called every step, so the full pages of a table (all but its last page or two) go into a
        set in one C-level update instead of a Python loop over every page."""
        bs = self.block_size
        full: set[int] = set()
        partial: dict[int, int] = {}  # page -> most slots filled by any sequence holding it
        for seq_id, table in self.block_tables.items():
            filled = self._filled.get(seq_id, 0)
            n_full = min(filled // bs, len(table))
            full.update(table[:n_full])
            for i in range(n_full, len(table)):
                p, n = table[i], min(max(filled - i * bs, 0), bs)
                if n > partial.get(p, -1):
                    partial[p] = n
        partial = {p: n for p, n in partial.items() if p not in full}
        return KVCacheStats(
            num_pages=self.pool.num_pages,
            pages_used=self.pool.num_used,
            pages_free=self.pool.num_free,
            allocated_slots=(len(full) + len(partial)) * bs,
            filled_slots=len(full) * bs + sum(partial.values()),
            pages_cached=self.pool.num_cached,
        )

    def check_invariants(self) -> None:
        """Ref counts equal the number of tables holding each page; no table holds a page twice."""
        self.pool.check_invariants()
        owners = [0] * self.pool.num_pages
        for seq_id, table in self.block_tables.items():
            assert len(set(table)) == len(table), f"{seq_id} holds a page twice"
            for p in table:
                owners[p] += 1
        for p, n in enumerate(owners):
            assert n == self.pool.ref_counts[p], (
                f"page {p}: {n} owners but ref count {self.pool.ref_counts[p]}"
            )
