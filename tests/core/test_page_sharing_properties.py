"""Hypothesis state machine over the host-side core with page sharing in play: prefix caching (with
LRU eviction), parallel samples forked from their first sample, beam-like forks of running requests,
copy-on-write, preemption, aborts and cache resets.

A simulated page pool stores, per slot, the token id whose K/V "was written" there. Every step it
applies the pending copy-on-write copies, then writes each chunk's new tokens — asserting that the
page written is referenced once and not in the prefix cache — and then checks that every scheduled
sequence reads exactly its own tokens through its block table (so cache hits and forks are right).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pagedjax.config import SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.request import Request, RequestStatus
from pagedjax.core.scheduler import RequestRejectedError, Scheduler
from pagedjax.sampling_params import SamplingParams

_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)
PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 1, 2], [20, 21, 22, 23, 24, 25, 26, 27]]


def _slot_stats_by_definition(kv: KVCacheManager) -> tuple[int, int]:
    """(allocated, filled) slots page by page: a page shared by several tables counts once, with the
    most slots any of its holders filled."""
    pages: dict[int, int] = {}
    for seq_id, table in kv.block_tables.items():
        filled = kv._filled.get(seq_id, 0)
        for i, p in enumerate(table):
            pages[p] = max(pages.get(p, 0), min(max(filled - i * kv.block_size, 0), kv.block_size))
    return len(pages) * kv.block_size, sum(pages.values())


class SharingMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_pages=st.integers(8, 40),
        max_num_seqs=st.integers(3, 6),
        max_num_batched_tokens=st.integers(4, 32),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_size, num_pages, max_num_seqs, max_num_batched_tokens, seed):
        cfg = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=48,
            max_num_prefill_seqs=4,
        )
        self.kv = KVCacheManager(num_pages, block_size, enable_prefix_caching=True)
        self.sched = Scheduler(cfg, self.kv)
        self.slots: dict[int, dict[int, int]] = {p: {} for p in range(num_pages)}  # page -> offset -> token
        self.rng = random.Random(seed)
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    # ---- operations
    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))),
        cut=st.integers(0, 9),
        tail=st.integers(0, 6),
        max_tokens=st.integers(1, 12),
        n=st.integers(1, 3),
    )
    def add(self, prefix, cut, tail, max_tokens, n):
        prompt = PREFIXES[prefix][:cut] + [self.rng.randrange(3) for _ in range(tail)]
        if not prompt:
            prompt = [1]
        reqs = [Request(self._new_id(), prompt, _PARAMS, seed=0, max_tokens=max_tokens) for _ in range(n)]
        try:
            self.sched.add_request(reqs[0])
        except RequestRejectedError:
            return
        if n > 1:
            self.sched.add_forked_samples(reqs[0], reqs[1:])

    @rule(data=st.data())
    def fork_running(self, data):
        """Like a beam: a new request continues a running one's tokens plus one, sharing its pages."""
        ready = [
            r
            for r in self.sched.running
            if r.num_computed_tokens == r.num_tokens
            and r.num_tokens < 40
            and self.sched._running_load() < self.sched.config.max_num_seqs
        ]
        if not ready:
            return
        src = data.draw(st.sampled_from(ready))
        new = Request(
            self._new_id(),
            src.prompt_token_ids,
            _PARAMS,
            seed=0,
            max_tokens=src.max_tokens + 1,
            output_token_ids=src.output_token_ids + [self.rng.randrange(3)],
        )
        self.sched.fork_request(src, new)

    @rule()
    def step(self):
        out = self.sched.schedule()
        bs = self.kv.block_size
        for src, dst in self.kv.take_pending_copies():
            self.slots[dst] = dict(self.slots[src])
        for ch in out.decodes + out.prefills:
            req, table = ch.request, self.kv.block_tables[ch.request.request_id]
            for pos in range(ch.start, ch.end):
                page = table[pos // bs]
                assert self.kv.pool.ref_counts[page] == 1, f"write into shared page {page}"
                assert not self.kv.pool.is_cached(page), f"write into cached page {page}"
            for pos in range(ch.start, ch.end):
                self.slots[table[pos // bs]][pos % bs] = req.token_ids_slice(pos, pos + 1)[0]
        self.sched._share_forked_pages(out)
        for ch in out.chunks:
            req, table = ch.request, self.kv.block_tables[ch.request.request_id]
            seen = [self.slots[table[p // bs]].get(p % bs) for p in range(ch.end)]
            assert seen == req.token_ids_slice(0, ch.end), f"{req.request_id} reads wrong K/V"
        for ch in out.chunks:
            req = ch.request
            req.num_computed_tokens = ch.end
            self.kv.mark_filled(req.request_id, ch.end)
            self.kv.cache_full_pages(req.request_id, ch.end, req.token_ids_slice(0, ch.end))
            if ch.samples:
                req.output_token_ids.append(self.rng.randrange(3))
                if req.num_output_tokens >= req.max_tokens:
                    self.sched.finish(req, RequestStatus.FINISHED_LENGTH)

    @rule(data=st.data())
    def abort(self, data):
        if self.sched.requests:
            rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
            self.sched.abort(rid)

    @rule()
    def reset_cache(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def consistent(self):
        if hasattr(self, "sched"):
            self.sched.check_invariants()
            assert len(self.sched.running) <= self.sched.config.max_num_seqs
            st_ = self.kv.stats()
            assert (st_.allocated_slots, st_.filled_slots) == _slot_stats_by_definition(self.kv)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(2000):
            if not self.sched.num_unfinished:
                break
            self.step()
        assert not self.sched.num_unfinished, "requests left unfinished (liveness)"
        pool = self.kv.pool
        assert pool.num_used == 0 and not self.kv.block_tables, "pages leaked"
        assert all(c == 0 for c in pool.ref_counts)
        pool.check_invariants()  # only free pages remain, some of them still cached


TestSharingMachine = SharingMachine.TestCase
TestSharingMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("block_size", [1, 4])
def test_hits_skip_computed_tokens(block_size):
    """A second request with the same prompt starts at the cached full pages (last token left)."""
    kv = KVCacheManager(16, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32), kv)
    prompt = list(range(3, 14))  # 11 tokens
    a = Request("a", prompt, _PARAMS, seed=0, max_tokens=1)
    sched.add_request(a)
    (ch,) = sched.schedule().chunks
    a.num_computed_tokens = ch.end
    kv.cache_full_pages("a", ch.end, prompt)
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    b = Request("b", prompt, _PARAMS, seed=0, max_tokens=1)
    sched.add_request(b)
    (ch,) = sched.schedule().chunks
    assert ch.start == (len(prompt) - 1) // block_size * block_size == b.num_cached_tokens
    assert kv.num_hit_tokens == ch.start and kv.num_queried_tokens == 2 * len(prompt)
