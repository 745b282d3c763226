"""Property tests of the host-only scheduling core: Scheduler + KVCacheManager + PagePool + Request.

No model and no JAX: a tiny simulated engine plays the runner's part. After `schedule()` every chunk
goes through `Scheduler.update_from_output` with a fake token for every chunk that samples (which
advances computed tokens, appends, and finishes the request once it reaches `max_tokens`).
Hypothesis drives random interleavings of adds, steps and aborts over pools small enough to force
preemption, and checks the scheduler's invariants and step limits after every operation, then that
everything finishes (liveness) and that all pages come back.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedjax.config import SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.model_output import ModelOutput
from pagedjax.core.page_pool import OutOfPagesError, PagePool
from pagedjax.core.request import Request, RequestStatus
from pagedjax.core.scheduler import RequestRejectedError, Scheduler, SchedulerOutput
from pagedjax.sampling_params import SamplingParams

FAKE_TOKEN = 7
_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)


# ------------------------------------------------------------------------------------------------
# The simulated engine.
# ------------------------------------------------------------------------------------------------


def make_scheduler(
    num_pages: int,
    block_size: int = 4,
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 16,
    max_model_len: int = 64,
    max_num_prefill_seqs: int = 4,
    policy: str = "fcfs",
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        max_num_prefill_seqs=max_num_prefill_seqs,
        policy=policy,
    )
    # No prefix caching here (tests/core/test_page_sharing_properties.py covers it): a new request
    # then always starts from 0 computed tokens, which check_step relies on.
    return Scheduler(cfg, KVCacheManager(num_pages, block_size, enable_prefix_caching=False))


def make_request(
    rid: str, prompt_len: int, max_tokens: int, priority: int = 0, arrival: float = 0.0
) -> Request:
    prompt = [(3 + i) % 50 for i in range(prompt_len)]
    return Request(
        rid, prompt, _PARAMS, seed=0, max_tokens=max_tokens, priority=priority, arrival_time=arrival
    )


def check_step(sched: Scheduler, out: SchedulerOutput, before: dict[str, int]) -> None:
    """Limits and consistency of one SchedulerOutput, checked right after `schedule()` (before the
    simulated runner advances anything). `before`: request id -> num_computed_tokens before the step."""
    cfg = sched.config
    kv = sched.kv_cache
    chunks = out.chunks
    ids = [c.request.request_id for c in chunks]
    assert len(ids) == len(set(ids)), f"a request was scheduled twice in one step: {ids}"
    assert out.num_tokens == sum(c.num_new_tokens for c in chunks)
    assert out.num_tokens <= cfg.max_num_batched_tokens, "step exceeds the token budget"
    assert len(sched.running) <= cfg.max_num_seqs, "more running requests than max_num_seqs"
    assert len(chunks) <= cfg.max_num_seqs
    assert len(out.prefills) <= cfg.max_num_prefill_seqs, "more prefill chunks than max_num_prefill_seqs"
    assert all(c.num_new_tokens == 1 for c in out.decodes), "a decode chunk with != 1 new token"
    assert all(c.num_new_tokens > 1 for c in out.prefills), "a prefill chunk with <= 1 new token"
    assert not set(out.preempted) & set(ids), "a request was preempted and scheduled in the same step"
    if sched.num_unfinished:
        # Something always runs while requests are left (the running head, or the waiting head into
        # an idle pool; the last running request always fits): an empty step would stall the engine.
        assert chunks, "empty step although requests are unfinished"
    running = {r.request_id for r in sched.running}
    for c in chunks:
        req = c.request
        rid = req.request_id
        assert rid in running and req.status == RequestStatus.RUNNING
        assert c.start == req.num_computed_tokens == before.get(rid, 0), "chunk does not start at computed"
        assert c.start < c.end <= req.num_tokens
        table = kv.block_tables[rid]
        # Pages cover exactly the computed tokens plus this chunk: none missing, none extra.
        assert len(table) == kv.pages_needed(c.end), f"{rid}: {len(table)} pages for {c.end} tokens"
    for rid in out.preempted:
        req = next((r for r in sched.waiting if r.request_id == rid), None)
        assert req is not None, f"preempted {rid} is not back in the waiting queue"
        assert req.status == RequestStatus.PREEMPTED
        assert req.num_computed_tokens == 0, "a preempted request must restart from 0 computed tokens"
        assert rid not in kv.block_tables, "a preempted request kept its pages"


def run_step(sched: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step with a fake runner. Returns the output and the requests that finished."""
    before = {r.request_id: r.num_computed_tokens for r in sched.running}
    out = sched.schedule()
    check_step(sched, out, before)
    out.running_order = [r.request_id for r in sched.running]  # admission order, for the FCFS check
    model_out = ModelOutput(sampled={c.request.request_id: [FAKE_TOKEN] for c in out.chunks if c.samples})
    finished = []
    for update in sched.update_from_output(out, model_out):
        req = next(c.request for c in out.chunks if c.request.request_id == update.request_id)
        assert req.num_computed_tokens == req.num_tokens - 1
        if update.finish_reason is not None:
            assert req.num_output_tokens >= req.max_tokens and req.status == RequestStatus.FINISHED_LENGTH
            assert req.request_id not in sched.kv_cache.block_tables
            finished.append(req)
    sched.check_invariants()
    return out, finished


def drain(sched: Scheduler, max_steps: int) -> int:
    """Step until every request finished; fail if that takes more than `max_steps` steps."""
    steps = 0
    while sched.num_unfinished:
        assert steps < max_steps, f"not finished after {max_steps} steps (liveness)"
        run_step(sched)
        steps += 1
    return steps


def assert_all_pages_free(sched: Scheduler) -> None:
    kv = sched.kv_cache
    assert kv.pool.num_free == kv.pool.num_pages, f"{kv.pool.num_used} pages still used"
    assert not kv.block_tables
    assert all(c == 0 for c in kv.pool.ref_counts)
    assert not sched.running and not len(sched.waiting)


def fits(sched: Scheduler, prompt_len: int, max_tokens: int) -> bool:
    total = prompt_len + max_tokens
    return (
        total <= sched.config.max_model_len
        and sched.kv_cache.pages_needed(total) <= sched.kv_cache.pool.num_pages
    )


# ------------------------------------------------------------------------------------------------
# Stateful: random adds / steps / aborts.
# ------------------------------------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4, 8]),
        num_pages=st.integers(1, 24),
        max_num_seqs=st.integers(1, 6),
        max_num_batched_tokens=st.integers(2, 40),
        max_num_prefill_seqs=st.integers(1, 4),
        max_model_len=st.integers(2, 96),
        policy=st.sampled_from(["fcfs", "priority"]),
    )
    def setup(
        self,
        block_size,
        num_pages,
        max_num_seqs,
        max_num_batched_tokens,
        max_num_prefill_seqs,
        max_model_len,
        policy,
    ):
        self.sched = make_scheduler(
            num_pages,
            block_size,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            max_num_prefill_seqs,
            policy,
        )
        self.reqs: dict[str, Request] = {}  # every accepted request, finished or not
        self.ended: set[str] = set()
        self.next_id = 0
        self.admitted: list[str] = []  # first-admission order
        self.steps = 0

    # ---- operations
    @rule(prompt_len=st.integers(1, 60), max_tokens=st.integers(1, 30), priority=st.integers(0, 3))
    def add(self, prompt_len, max_tokens, priority):
        rid = f"r{self.next_id}"
        req = make_request(rid, prompt_len, max_tokens, priority, arrival=float(self.next_id))
        self.next_id += 1
        n_waiting, n_unfinished = len(self.sched.waiting), self.sched.num_unfinished
        if not fits(self.sched, prompt_len, max_tokens):
            with pytest.raises(RequestRejectedError):
                self.sched.add_request(req)
            assert len(self.sched.waiting) == n_waiting and self.sched.num_unfinished == n_unfinished
            return
        self.sched.add_request(req)
        self.reqs[rid] = req
        assert req.status == RequestStatus.WAITING

    @rule()
    def step(self):
        waiting_before = {r.request_id for r in self.sched.waiting if r.num_preemptions == 0}
        out, finished = run_step(self.sched)
        self.steps += 1
        for rid in out.running_order:
            if rid in waiting_before and rid not in self.admitted:
                self.admitted.append(rid)
        for req in finished:
            assert req.num_output_tokens == req.max_tokens
            self.ended.add(req.request_id)

    @rule(data=st.data())
    def abort(self, data):
        ids = sorted(self.reqs) + ["unknown"]
        rid = data.draw(st.sampled_from(ids), label="abort id")
        kv = self.sched.kv_cache
        req = self.reqs.get(rid)
        active = req is not None and not req.is_finished
        held = len(kv.block_tables.get(rid, []))
        used = kv.pool.num_used
        got = self.sched.abort(rid)
        if not active:
            assert got is None
            return
        assert got is req and req.status == RequestStatus.FINISHED_ABORTED
        assert rid not in kv.block_tables and kv.pool.num_used == used - held, (
            "abort did not free pages at once"
        )
        assert all(r is not req for r in [*self.sched.running, *self.sched.waiting])
        self.ended.add(rid)

    @precondition(lambda self: self.sched.num_unfinished > 0)
    @rule()
    def drain_all(self):
        self._drain()

    def _drain(self):
        active = [r for r in self.reqs.values() if not r.is_finished]
        work = sum(r.num_prompt_tokens + r.max_tokens for r in active)
        # FCFS: the running head is never preempted and computes >= 1 token per step, so the steps
        # are bounded by the total remaining work. Priority: a head may give way to a more urgent
        # request, so allow recomputation of every request once per other request.
        bound = work + 2 if self.sched.config.policy == "fcfs" else (len(active) + 1) * (work + 2)
        drain(self.sched, bound)
        for r in active:
            assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens
            self.ended.add(r.request_id)
        assert_all_pages_free(self.sched)

    # ---- invariants after every operation
    @invariant()
    def consistent(self):
        if not hasattr(self, "sched"):
            return
        sched = self.sched
        sched.check_invariants()
        kv = sched.kv_cache
        unfinished = {rid for rid, r in self.reqs.items() if not r.is_finished}
        assert unfinished == set(sched.requests)
        assert unfinished.isdisjoint(self.ended)
        for r in sched.running:
            assert r.status == RequestStatus.RUNNING
            assert len(kv.block_tables.get(r.request_id, [])) == kv.pages_needed(r.num_computed_tokens)
            assert r.num_computed_tokens < r.num_tokens, "a running request with nothing left to compute"
        for r in sched.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.num_computed_tokens == 0 and r.request_id not in kv.block_tables
        if sched.config.policy == "fcfs":
            order = sorted(self.admitted, key=lambda rid: self.reqs[rid].arrival_time)
            assert self.admitted == order, "FCFS admitted requests out of arrival order"
        if not unfinished:
            assert_all_pages_free(sched)

    def teardown(self):
        if hasattr(self, "sched") and self.sched.num_unfinished:
            self._drain()


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSchedulerStateful = SchedulerMachine.TestCase


# ------------------------------------------------------------------------------------------------
# Batch liveness: many requests at once over a tight pool.
# ------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(0, 2)), min_size=1, max_size=12
    ),
    num_pages=st.integers(2, 16),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 8),
    max_num_batched_tokens=st.integers(2, 32),
    max_num_prefill_seqs=st.integers(1, 3),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_every_request_finishes_and_frees_its_pages(
    sizes, num_pages, block_size, max_num_seqs, max_num_batched_tokens, max_num_prefill_seqs, policy
):
    sched = make_scheduler(
        num_pages, block_size, max_num_seqs, max_num_batched_tokens, 64, max_num_prefill_seqs, policy
    )
    reqs = []
    for i, (p, m, prio) in enumerate(sizes):
        req = make_request(f"r{i}", p, m, prio, arrival=float(i))
        if fits(sched, p, m):
            sched.add_request(req)
            reqs.append(req)
        else:
            with pytest.raises(RequestRejectedError):
                sched.add_request(req)
    sched.check_invariants()
    work = sum(r.num_prompt_tokens + r.max_tokens for r in reqs)
    bound = work + 2 if policy == "fcfs" else (len(reqs) + 1) * (work + 2)
    drain(sched, bound)
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [FAKE_TOKEN] * r.max_tokens
    assert_all_pages_free(sched)


# ------------------------------------------------------------------------------------------------
# Unit tests.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len,max_tokens,why",
    [(60, 5, "max_model_len"), (64, 1, "max_model_len"), (30, 30, "pages"), (0, 4, "at least one token")],
)
def test_request_that_can_never_fit_is_rejected_and_others_unaffected(prompt_len, max_tokens, why):
    sched = make_scheduler(num_pages=12, block_size=4, max_model_len=64)  # pool: 48 tokens
    ok = [make_request("a", 10, 5), make_request("b", 20, 8)]
    for r in ok:
        sched.add_request(r)
    run_step(sched)  # one of them is running, with pages
    used, running, waiting = sched.kv_cache.pool.num_used, list(sched.running), list(sched.waiting)
    bad = make_request("bad", prompt_len, max_tokens)
    with pytest.raises(RequestRejectedError, match=why):
        sched.add_request(bad)
    with pytest.raises(ValueError):  # RequestRejectedError is a ValueError
        sched.check_fits(prompt_len, max_tokens)
    assert "bad" not in sched.requests
    assert (
        sched.kv_cache.pool.num_used == used and sched.running == running and list(sched.waiting) == waiting
    )
    sched.check_invariants()
    drain(sched, 200)
    assert [r.num_output_tokens for r in ok] == [5, 8]
    assert_all_pages_free(sched)


def test_largest_request_that_fits_is_accepted():
    sched = make_scheduler(num_pages=12, block_size=4, max_model_len=64)
    sched.add_request(make_request("full", 40, 8))  # 48 tokens = exactly the whole pool
    drain(sched, 100)
    assert_all_pages_free(sched)


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler(num_pages=8)
    sched.add_request(make_request("x", 4, 2))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("x", 4, 2))
    assert sched.num_unfinished == 1


def test_preemption_with_a_tiny_pool_restarts_from_zero():
    # 6 pages of 4 tokens; each request eventually needs 5 pages, so two cannot run together to the end.
    sched = make_scheduler(num_pages=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = make_request("a", 8, 12, arrival=0.0), make_request("b", 8, 12, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    seen_preempted = False
    restarted_at = []
    for _ in range(100):
        if not sched.num_unfinished:
            break
        out, _ = run_step(sched)
        if out.preempted:
            seen_preempted = True
            assert out.preempted == ["b"], "FCFS preempts the most recently admitted request"
            assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
            assert "b" not in sched.kv_cache.block_tables
            assert b.num_output_tokens > 0, "b had generated tokens before it was preempted"
            kept = list(b.output_token_ids)
        elif seen_preempted and any(c.request is b for c in out.chunks) and not restarted_at:
            ch = next(c for c in out.chunks if c.request is b)
            restarted_at.append(ch.start)
            assert b.output_token_ids[: len(kept)] == kept, "recomputation keeps the generated tokens"
    assert seen_preempted and sched.num_preemptions > 0 and b.num_preemptions > 0
    assert restarted_at == [0], "a preempted request recomputes from token 0"
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert_all_pages_free(sched)


def test_priority_policy_schedules_lower_value_first():
    sched = make_scheduler(num_pages=32, max_num_seqs=1, policy="priority")
    for rid, prio, t in [("low", 2, 0.0), ("high", 0, 1.0), ("mid", 1, 2.0), ("high2", 0, 3.0)]:
        sched.add_request(make_request(rid, 3, 2, priority=prio, arrival=t))
    order = []
    for _ in range(100):
        if not sched.num_unfinished:
            break
        out, _ = run_step(sched)
        for c in out.chunks:
            if c.request.request_id not in order:
                order.append(c.request.request_id)
    assert order == ["high", "high2", "mid", "low"]
    assert_all_pages_free(sched)


def test_priority_policy_preempts_the_least_urgent_request():
    sched = make_scheduler(
        num_pages=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, policy="priority"
    )
    lo = make_request("lo", 8, 12, priority=5, arrival=0.0)
    hi = make_request("hi", 8, 12, priority=0, arrival=1.0)
    sched.add_request(lo)
    run_step(sched)  # lo runs alone first
    sched.add_request(hi)
    preempted = []
    while sched.num_unfinished:
        out, _ = run_step(sched)
        preempted += out.preempted
    assert preempted and set(preempted) == {"lo"}, preempted
    assert hi.num_preemptions == 0 and lo.num_preemptions > 0
    assert_all_pages_free(sched)


def test_priority_waiting_queue_iterates_requests_in_priority_order():
    """Iterating the waiting queue yields Request objects (check_invariants and callers rely on it)."""
    sched = make_scheduler(num_pages=8, policy="priority")
    for rid, prio, t in [("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)]:
        sched.add_request(make_request(rid, 2, 1, priority=prio, arrival=t))
    waiting = list(sched.waiting)
    assert all(isinstance(r, Request) for r in waiting), [type(r).__name__ for r in waiting]
    assert [r.request_id for r in waiting] == ["b", "d", "c", "a"]
    sched.check_invariants()


def test_fcfs_waiting_queue_keeps_arrival_order():
    sched = make_scheduler(num_pages=32, max_num_seqs=1)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 2, 1, arrival=float(i)))
    order = []
    while sched.num_unfinished:
        out, _ = run_step(sched)
        order += [c.request.request_id for c in out.chunks]
    assert order == ["r0", "r1", "r2", "r3"]


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        make_scheduler(num_pages=4, policy="lifo")


def test_abort_waiting_and_running_requests_frees_pages_immediately():
    sched = make_scheduler(num_pages=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=8)
    run_req, wait_req = make_request("run", 6, 4), make_request("wait", 6, 4)
    sched.add_request(run_req)
    sched.add_request(wait_req)
    run_step(sched)  # max_num_seqs=1: "run" holds pages, "wait" waits
    assert run_req.status == RequestStatus.RUNNING and wait_req.status == RequestStatus.WAITING
    held = len(sched.kv_cache.block_tables["run"])
    assert held > 0 and "wait" not in sched.kv_cache.block_tables

    assert sched.abort("wait") is wait_req
    assert wait_req.status == RequestStatus.FINISHED_ABORTED and wait_req.finish_reason == "abort"
    assert len(sched.waiting) == 0 and sched.kv_cache.pool.num_used == held
    sched.check_invariants()

    assert sched.abort("run") is run_req
    assert run_req.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache.pool.num_used == 0 and not sched.running
    sched.check_invariants()
    assert sched.abort("run") is None and sched.abort("never") is None
    assert sched.schedule().is_empty


def test_abort_frees_room_for_waiting_request_in_the_next_step():
    sched = make_scheduler(num_pages=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    big, small = make_request("big", 12, 4), make_request("small", 4, 2)
    sched.add_request(big)
    run_step(sched)  # big takes 3 of 4 pages
    sched.add_request(small)
    out, _ = run_step(sched)
    assert all(c.request is big for c in out.chunks)  # big grows into the last page: no room for small
    sched.abort("big")
    out, _ = run_step(sched)
    assert [c.request.request_id for c in out.chunks] == ["small"]


def test_preempted_request_can_be_aborted():
    sched = make_scheduler(num_pages=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    a, b = make_request("a", 8, 12), make_request("b", 8, 12)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(50):
        out, _ = run_step(sched)
        if out.preempted:
            break
    assert b.status == RequestStatus.PREEMPTED
    assert sched.abort("b") is b and b.status == RequestStatus.FINISHED_ABORTED
    sched.check_invariants()
    drain(sched, 50)
    assert_all_pages_free(sched)


# ---- PagePool / KVCacheManager


def test_page_pool_allocate_share_release():
    pool = PagePool(4)
    assert (pool.num_free, pool.num_used) == (4, 0)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and all(pool.ref_counts[p] == 1 for p in a)
    with pytest.raises(OutOfPagesError):
        pool.allocate(2)
    assert pool.num_free == 1, "a failed allocate must not take any page"
    pool.share(a[:2])
    assert [pool.ref_counts[p] for p in a] == [2, 2, 1]
    pool.release(a)
    assert [pool.ref_counts[p] for p in a] == [1, 1, 0] and pool.num_free == 2
    pool.check_invariants()
    pool.release(a[:2])
    assert pool.num_free == 4 and pool.num_used == 0
    pool.check_invariants()
    b = pool.allocate(4)
    assert sorted(b) == [0, 1, 2, 3]
    pool.release(b)
    pool.check_invariants()


def test_page_pool_places_sequences_in_contiguous_runs():
    pool = PagePool(64)
    a = pool.allocate(3)
    assert a == [0, 1, 2], "the first run starts the pool"
    b = pool.allocate(2)
    assert b == [33, 34], "a new run starts in the middle of the longest free run"
    assert pool.allocate(2, after=a[-1]) == [3, 4], "a sequence grows right after its last page"
    assert pool.allocate(1, after=b[-1]) == [35]
    c = pool.allocate(1)
    assert c == [5 + (33 - 5) // 2] or c == [36 + (64 - 36) // 2], "middle of a longest run"
    # A run that hits another sequence's page jumps to a new run instead of failing.
    d = pool.allocate(3, after=32)
    assert d[0] not in a + b + c and len(set(d)) == 3
    pool.check_invariants()


def test_page_pool_keeps_cached_pages_while_uncached_ones_are_free():
    pool = PagePool(4)
    p, q = pool.allocate(2)
    pool.cache_page(p, b"prefix")
    pool.release([p, q])
    got = pool.allocate(3)
    assert sorted(got) == [1, 2, 3] and pool.lookup(b"prefix") == p and pool.num_evictions == 0
    (last,) = pool.allocate(1)
    assert last == p and pool.lookup(b"prefix") is None and pool.num_evictions == 1
    pool.check_invariants()


def test_page_pool_errors():
    with pytest.raises(ValueError):
        PagePool(0)
    pool = PagePool(2)
    (p,) = pool.allocate(1)
    pool.release([p])
    with pytest.raises(ValueError, match="released more often"):
        pool.release([p])
    with pytest.raises(ValueError, match="cannot be shared"):
        pool.share([p])
    pool.check_invariants()
    assert pool.num_free == 2 and pool.allocate(0) == []


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["alloc", "share", "release"]), st.integers(0, 5)), max_size=60)
)
def test_page_pool_matches_a_reference_model(ops):
    pool = PagePool(6)
    refs = [0] * 6
    held: list[int] = []  # one entry per reference we own
    for op, n in ops:
        if op == "alloc":
            if n > refs.count(0):
                with pytest.raises(OutOfPagesError):
                    pool.allocate(n)
            else:
                got = pool.allocate(n)
                assert all(refs[p] == 0 for p in got) and len(set(got)) == n
                for p in got:
                    refs[p] = 1
                held += got
        elif op == "share" and held:
            p = held[n % len(held)]
            pool.share([p])
            refs[p] += 1
            held.append(p)
        elif op == "release" and held:
            p = held.pop(n % len(held))
            pool.release([p])
            refs[p] -= 1
        assert pool.ref_counts == refs
        assert pool.num_free == refs.count(0)
        pool.check_invariants()
    for p in held:
        pool.release([p])
    assert pool.num_free == 6


def test_kv_cache_manager_slots_and_failed_allocation():
    kv = KVCacheManager(num_pages=3, block_size=4)
    assert kv.allocate_slots("a", 5)  # 2 pages
    assert kv.allocate_slots("a", 8)  # still 2 pages
    assert len(kv.block_tables["a"]) == 2
    assert not kv.allocate_slots("b", 9), "3 pages needed, 1 free"
    assert "b" not in kv.block_tables and kv.pool.num_free == 1
    assert not kv.allocate_slots("a", 13)
    assert len(kv.block_tables["a"]) == 2, "a failed allocation leaves the table unchanged"
    pages, offsets = kv.slots("a", 2, 7)
    table = kv.block_tables["a"]
    assert pages.tolist() == [table[0], table[0], table[1], table[1], table[1]]
    assert offsets.tolist() == [2, 3, 0, 1, 2]
    kv.mark_filled("a", 7)
    st_ = kv.stats()
    assert (st_.pages_used, st_.pages_free, st_.allocated_slots, st_.filled_slots) == (2, 1, 8, 7)
    assert st_.waste == pytest.approx(1 / 8)
    kv.check_invariants()
    kv.free("a")
    kv.free("a")  # freeing twice is harmless
    assert kv.pool.num_free == 3 and kv.stats().waste == 0.0
    kv.check_invariants()
