"""`Scheduler.update_from_output` with several new tokens per request and rollback of rejected
draft tokens (the speculative-decoding shape of a step), as a Hypothesis state machine.

A simulated runner writes each scheduled token (drafts included) into a fake page pool, then
"verifies" a random prefix of each request's drafts and adds a bonus token; requests are also
aborted at random (while speculating, waiting or preempted). After every step:
no page is leaked or double-owned, computed tokens never exceed total tokens, a running request's
pages cover exactly its computed tokens, every request reads back exactly its own verified tokens
(also through adopted cached prefixes, so no page holding a rejected draft was ever cached), and at
the end every page is free.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedjax.config import SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.model_output import ModelOutput
from pagedjax.core.request import Request, RequestStatus
from pagedjax.core.scheduler import Scheduler
from pagedjax.sampling_params import SamplingParams

EOS = 0
PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 13, 14, 15, 16], [20, 21, 22]]


class SpecDecodeMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_pages=st.integers(8, 40),
        budget=st.integers(4, 24),
        max_num_seqs=st.integers(1, 4),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_size, num_pages, budget, max_num_seqs, seed):
        cfg = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=40, max_num_prefill_seqs=4
        )
        self.kv = KVCacheManager(num_pages, block_size, enable_prefix_caching=True)
        self.sched = Scheduler(cfg, self.kv)
        self.rng = random.Random(seed)
        self.slots: dict[int, dict[int, int]] = {p: {} for p in range(num_pages)}
        self.next_id = 0
        self.finished: list[Request] = []

    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))), extra=st.integers(0, 6), max_tokens=st.integers(1, 12)
    )
    def add(self, prefix, extra, max_tokens):
        prompt = PREFIXES[prefix] + [30 + self.rng.randrange(4) for _ in range(extra)]
        params = SamplingParams(temperature=0.0, min_tokens=self.rng.choice([0, 0, 3]))
        req = Request(f"r{self.next_id}", prompt, params, seed=0, max_tokens=max_tokens, eos_token_ids=(EOS,))
        self.next_id += 1
        try:
            self.sched.add_request(req)
        except ValueError:
            pass  # too long for this pool: rejected up front, nothing changes

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def propose_drafts(self, data):
        """Give some running requests 1..5 draft tokens (most drafts repeat the last token, so a
        'target' that continues the pattern accepts several)."""
        for req in self.sched.running:
            if data.draw(st.booleans(), label="draft?"):
                k = data.draw(st.integers(1, 5), label="k")
                req.spec_token_ids = [self.rng.choice([EOS, 3, 4, 4, 4]) for _ in range(k)]

    @precondition(lambda self: self.sched.num_unfinished)
    @rule(data=st.data())
    def abort(self, data):
        """Abort one unfinished request (running with drafts, waiting, or preempted)."""
        live = [r for r in self.sched.requests.values() if not r.is_finished]
        req = data.draw(st.sampled_from(live), label="abort")
        self.sched.finish(req, RequestStatus.FINISHED_ABORTED)
        assert req.request_id not in self.kv.block_tables

    @precondition(lambda self: self.sched.num_unfinished)
    @rule()
    def step(self):
        out = self.sched.schedule()
        bs = self.kv.block_size
        for src, dst in self.kv.take_pending_copies():
            self.slots[dst] = dict(self.slots[src])
        model_out = ModelOutput()
        for ch in out.chunks:
            req, table = ch.request, self.kv.block_tables[ch.request.request_id]
            # It reads its verified tokens (computed ones, incl. adopted cached pages) correctly.
            seen = [self.slots[table[p // bs]].get(p % bs) for p in range(ch.start)]
            assert seen == req.token_ids_slice(0, ch.start), f"{req.request_id} reads wrong K/V"
            assert ch.num_spec_tokens <= len(req.spec_token_ids)
            for pos in range(ch.start, ch.end):
                page = table[pos // bs]
                assert self.kv.pool.ref_counts[page] == 1 and not self.kv.pool.is_cached(page)
                self.slots[page][pos % bs] = req.token_at(pos)
            if ch.samples:
                drafts = req.spec_token_ids[: ch.num_spec_tokens]
                accepted = self.rng.randint(0, len(drafts))
                bonus = self.rng.choice([EOS, 3, 4, 9])
                model_out.sampled[req.request_id] = drafts[:accepted] + [bonus]
                model_out.logprobs[req.request_id] = [{t: -1.0} for t in drafts[:accepted] + [bonus]]
        before = {ch.request.request_id: ch.request.num_output_tokens for ch in out.chunks}
        updates = self.sched.update_from_output(out, model_out)
        for u in updates:
            req = next(ch.request for ch in out.chunks if ch.request.request_id == u.request_id)
            assert req.output_token_ids[before[u.request_id] :] == u.new_token_ids
            assert u.new_token_ids == model_out.sampled[u.request_id][: len(u.new_token_ids)]
            assert len(req.logprobs) == req.num_output_tokens
            assert req.num_output_tokens <= req.max_tokens
            if u.finish_reason is not None:
                assert req.is_finished and req.request_id not in self.kv.block_tables
                self.finished.append(req)
                last = u.new_token_ids[-1]
                if u.finish_reason == "stop":
                    assert last == EOS and req.num_output_tokens >= req.sampling_params.min_tokens
            else:
                assert EOS not in u.new_token_ids[req.sampling_params.min_tokens :] or (
                    req.num_output_tokens <= req.sampling_params.min_tokens
                )
        for req in self.sched.running:
            assert not req.spec_token_ids or req.request_id not in before, "drafts survived their step"

    @invariant()
    def consistent(self):
        if not hasattr(self, "sched"):
            return
        self.sched.check_invariants()
        for req in self.sched.requests.values():
            assert 0 <= req.num_computed_tokens <= req.num_tokens, "computed tokens exceed total tokens"
        for req in self.sched.running:
            table = self.kv.block_tables.get(req.request_id, [])
            assert len(table) == self.kv.pages_needed(req.num_computed_tokens), (
                f"{req.request_id}: {len(table)} pages for {req.num_computed_tokens} computed tokens"
            )

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(500):
            if not self.sched.num_unfinished:
                break
            self.step()
        assert not self.sched.num_unfinished, "requests left unfinished (liveness)"
        assert self.kv.pool.num_free == self.kv.pool.num_pages, "pages leaked"
        for req in self.finished:
            assert req.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


TestSpecDecode = SpecDecodeMachine.TestCase
TestSpecDecode.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_multi_token_append_stops_at_eos_and_drops_the_rest():
    kv = KVCacheManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32), kv)
    req = Request(
        "a", [1, 2, 3], SamplingParams(temperature=0.0), seed=0, max_tokens=10, eos_token_ids=(EOS,)
    )
    sched.add_request(req)
    out = sched.schedule()
    sched.update_from_output(out, ModelOutput(sampled={"a": [4]}))
    req.spec_token_ids = [5, EOS, 6]
    out = sched.schedule()
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_new_tokens, chunk.num_spec_tokens) == (3, 4, 3)
    (update,) = sched.update_from_output(out, ModelOutput(sampled={"a": [5, EOS, 6, 7]}))
    assert update.new_token_ids == [5, EOS] and update.finish_reason == "stop"
    assert req.output_token_ids == [4, 5, EOS] and kv.pool.num_free == 16


def test_rejected_drafts_roll_back_pages():
    kv = KVCacheManager(16, 2, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32), kv)
    req = Request("a", [1, 2, 3], SamplingParams(temperature=0.0), seed=0, max_tokens=10)
    sched.add_request(req)
    sched.update_from_output(sched.schedule(), ModelOutput(sampled={"a": [4]}))  # 4 tokens, 3 computed
    req.spec_token_ids = [5, 6, 7, 8]
    out = sched.schedule()
    assert len(kv.block_tables["a"]) == kv.pages_needed(8)  # 3 computed + 1 + 4 drafts
    (update,) = sched.update_from_output(out, ModelOutput(sampled={"a": [9]}))  # first draft rejected
    assert update.new_token_ids == [9] and update.num_rejected_tokens == 4
    assert req.num_computed_tokens == 4 and req.num_tokens == 5
    assert len(kv.block_tables["a"]) == kv.pages_needed(4)
    assert kv.pool.num_used == 2


def test_drafts_are_capped_by_max_tokens():
    kv = KVCacheManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32), kv)
    req = Request("a", [1, 2, 3], SamplingParams(temperature=0.0), seed=0, max_tokens=3)
    sched.add_request(req)
    sched.update_from_output(sched.schedule(), ModelOutput(sampled={"a": [4]}))
    req.spec_token_ids = [5, 6, 7, 8]
    out = sched.schedule()
    assert out.chunks[0].num_spec_tokens == 1  # 1 output + 1 draft + 1 bonus = max_tokens
    (update,) = sched.update_from_output(out, ModelOutput(sampled={"a": [5, 6]}))
    assert update.finish_reason == "length" and req.output_token_ids == [4, 5, 6]
