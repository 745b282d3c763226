"""Iteration-level scheduler (continuous batching), host-only.

Every step it decides, under `max_num_batched_tokens` and `max_num_seqs`, how many new tokens each
request computes: running requests first (in order), then waiting ones (FCFS or by priority).
A request that needs pages the pool does not have preempts the lowest-priority running request
(its pages are freed and it is recomputed later) rather than failing. Finished or aborted requests
free their pages at once, so waiting requests take their place in the very next step.

Page sharing enters in three places: a request admitted from the waiting queue first adopts the
cached pages of its prefix (its computed tokens start there); the n samples of one prompt are forked
from the first sample in the step that completes the prompt (they share its pages, and sample their
first tokens from its logits row); beams are forked by the engine with `fork_request`.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from pagedjax.config import SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.model_output import ModelOutput, RequestUpdate
from pagedjax.core.request import Request, RequestStatus


class RequestRejectedError(ValueError):
    """A request that can never be served (too long for the model or for the whole pool)."""


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    # Forked samples compute no token: they sample from the logits row of their source's chunk.
    source: ScheduledChunk | None = None
    # Draft tokens (speculative decoding) among the new tokens, at the chunk's end.
    num_spec_tokens: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last known token: its logits give a new token
        (and, past it, one per draft token to verify)."""
        return self.end - self.num_spec_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # exactly one new token each
    prefills: list[ScheduledChunk] = field(default_factory=list)  # more than one new token each
    forks: list[ScheduledChunk] = field(default_factory=list)  # no new tokens, sample from a source
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_new_tokens for c in self.prefills)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        """All scheduled chunks in row order: decodes, forks (decode-row slots), prefills."""
        return self.decodes + self.forks + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.forks


class _WaitingQueue:
    """FCFS deque, or a heap on (priority, arrival) for the priority policy. Preempted requests
    go back to the front (FCFS) / keep their place (priority)."""

    def __init__(self, policy: str):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {policy!r}")
        self.policy = policy
        self._dq: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._dq) if self.policy == "fcfs" else len(self._heap)

    def push(self, req: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            (self._dq.appendleft if front else self._dq.append)(req)
        else:
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._counter), req))

    def peek(self) -> Request:
        return self._dq[0] if self.policy == "fcfs" else self._heap[0][3]

    def pop(self) -> Request:
        return self._dq.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> bool:
        if self.policy == "fcfs":
            try:
                self._dq.remove(req)
                return True
            except ValueError:
                return False
        for i, item in enumerate(self._heap):
            if item[3] is req:
                self._heap.pop(i)
                heapq.heapify(self._heap)
                return True
        return False

    def __iter__(self):
        return iter(self._dq) if self.policy == "fcfs" else iter([item[3] for item in sorted(self._heap)])


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting = _WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Source request id -> samples that fork from it once its prompt is computed.
        self.pending_forks: dict[str, list[Request]] = {}
        self.num_preemptions = 0

    # ----------------------------------------------------------------------------------- requests
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejectedError if a request of this size could never run."""
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens < 1:
            raise RequestRejectedError("prompt must contain at least one token")
        if total > self.config.max_model_len:
            raise RequestRejectedError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                f"max_model_len ({self.config.max_model_len})"
            )
        pages = self.kv_cache.pages_needed(total)
        if pages > self.kv_cache.pool.num_pages:
            raise RequestRejectedError(
                f"request needs {pages} KV pages but the pool only has {self.kv_cache.pool.num_pages}"
            )

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.check_fits(req.num_prompt_tokens, req.max_tokens)
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def add_forked_samples(self, source: Request, samples: list[Request]) -> None:
        """Register samples that share `source`'s prompt: they are forked from it (pages and logits
        row) in the step that completes its prompt, instead of each computing the prompt."""
        for s in samples:
            if s.request_id in self.requests:
                raise ValueError(f"request id {s.request_id!r} is already in use")
        if 1 + len(samples) > self.config.max_num_seqs:
            raise RequestRejectedError(
                f"{1 + len(samples)} parallel samples exceed max_num_seqs ({self.config.max_num_seqs})"
            )
        for s in samples:
            self.requests[s.request_id] = s
        self.pending_forks.setdefault(source.request_id, []).extend(samples)
        source.num_reserved_seats += len(samples)

    def fork_request(self, source: Request, new: Request) -> None:
        """Start `new` (source's tokens plus possibly more) sharing source's pages: it continues
        from source's computed tokens (copy-on-write protects the shared partial page)."""
        if new.request_id in self.requests:
            raise ValueError(f"request id {new.request_id!r} is already in use")
        self.requests[new.request_id] = new
        if source.status == RequestStatus.RUNNING and source.request_id in self.kv_cache.block_tables:
            self.kv_cache.fork(source.request_id, new.request_id)
            new.num_computed_tokens = min(source.num_computed_tokens, new.num_tokens - 1)
            new.status = RequestStatus.RUNNING
            self.running.append(new)
        else:
            new.num_computed_tokens = 0
            self.waiting.push(new, front=True)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Mark finished and free its pages immediately."""
        assert status.finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.status.finished and not self.waiting.remove(req):
            for samples in self.pending_forks.values():
                if req in samples:
                    samples.remove(req)
        samples = self.pending_forks.pop(req.request_id, [])
        req.num_reserved_seats = 0
        if samples:  # the source ended before its prompt was computed: the next sample takes over
            head, rest = samples[0], samples[1:]
            head.num_reserved_seats = len(rest)
            if rest:
                self.pending_forks[head.request_id] = rest
            self.waiting.push(head)
        req.status = status
        if req.finished_time is None:
            req.finished_time = time.time()
        self.kv_cache.free(req.request_id)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---------------------------------------------------------------------------------- scheduling
    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv_cache.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.spec_token_ids = []  # it recomputes from its verified tokens; new drafts come later
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(victim, front=True)
        out.preempted.append(victim.request_id)

    def preempt_all(self) -> list[str]:
        """Send every running request back to waiting to be recomputed (the KV pool was lost)."""
        out = SchedulerOutput()
        for req in reversed(list(self.running)):  # back to front keeps the queue's order
            self._preempt(req, out)
        return out.preempted

    def _pick_victim(self, candidates: list[Request]) -> Request:
        if self.config.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _add_chunk(self, out: SchedulerOutput, req: Request, num_new: int, scheduled: set[str]) -> None:
        start = req.num_computed_tokens
        chunk = ScheduledChunk(req, start, num_new, num_spec_tokens=max(0, start + num_new - req.num_tokens))
        (out.decodes if num_new == 1 else out.prefills).append(chunk)
        scheduled.add(req.request_id)
        if chunk.samples and req.request_id in self.pending_forks:
            # The prompt is complete this step: fork the parallel samples from it.
            for s in self.pending_forks.pop(req.request_id):
                s.num_computed_tokens = chunk.start
                s.status = RequestStatus.RUNNING
                s.num_cached_tokens = req.num_cached_tokens
                self.running.append(s)
                out.forks.append(ScheduledChunk(s, chunk.end, 0, source=chunk))
                scheduled.add(s.request_id)
            req.num_reserved_seats = 0

    def _share_forked_pages(self, out: SchedulerOutput) -> None:
        """After the step ran (its K/V written), give this step's forked samples their source's pages.
        Sharing only after the writes keeps the rule that no page is written while shared."""
        for ch in out.forks:
            if ch.source.request.status == RequestStatus.RUNNING:
                self.kv_cache.fork(ch.source.request.request_id, ch.request.request_id)

    def _num_spec_to_verify(self, req: Request) -> int:
        """Draft tokens worth computing: as many as could still be accepted, so that verifying them
        never needs K/V slots past the request's `max_tokens` or `max_model_len` (which `check_fits`
        sized the pool for)."""
        if not req.spec_token_ids or req.request_id in self.pending_forks:
            return 0  # a prompt whose samples fork from its last token verifies nothing
        room = min(req.max_tokens - req.num_output_tokens, self.config.max_model_len - req.num_tokens) - 1
        return max(0, min(len(req.spec_token_ids), room))

    def _running_load(self) -> int:
        """Seats taken in the running batch, counting seats reserved for future forks."""
        return sum(1 + r.num_reserved_seats for r in self.running)

    def _admit_with_cached_prefix(self, req: Request) -> None:
        """Adopt the prefix cache's pages for a request that holds none (new or preempted)."""
        if req.sampling_params.prompt_logprobs is not None:
            return  # vLLM's rule: prompt logprobs need every prompt position computed
        if req.num_computed_tokens == 0 and req.request_id not in self.kv_cache.block_tables:
            salt = (req.cache_salt or "").encode()
            tokens = req.token_ids_slice(0, req.num_tokens)
            req.num_computed_tokens = self.kv_cache.adopt_cached_prefix(req.request_id, tokens, salt)
            if req.num_cached_tokens is None:
                req.num_cached_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        scheduled: set[str] = set()

        # 1. Running requests, in order; preempt from the back when pages run out.
        i = 0
        num_speculating = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            spec = self._num_spec_to_verify(req) if num_speculating < cfg.max_num_spec_seqs else 0
            num_new = min(req.num_tokens + spec - req.num_computed_tokens, budget)
            if num_new == 0 or req.request_id in scheduled:  # e.g. a beam waiting for its siblings
                i += 1
                continue
            if num_new > 1 and len(out.prefills) >= cfg.max_num_prefill_seqs:
                if req.num_tokens - req.num_computed_tokens != 1:
                    i += 1
                    continue
                num_new = 1  # no prefill seat left for its drafts: a plain decode (drafts dropped)
            start = req.num_computed_tokens
            while not self.kv_cache.allocate_slots(req.request_id, start + num_new, write_from=start):
                victims = [r for r in self.running[i:] if r.request_id not in scheduled]
                victim = self._pick_victim(victims)
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self._add_chunk(out, req, num_new, scheduled)
                num_speculating += req.num_computed_tokens + num_new > req.num_tokens
                budget -= num_new
                i += 1

        # 2. Waiting requests, while there is room (never when this step had to preempt).
        while len(self.waiting) and budget > 0 and not out.preempted:
            req = self.waiting.peek()
            if self._running_load() + 1 + req.num_reserved_seats > cfg.max_num_seqs:
                break
            self._admit_with_cached_prefix(req)
            start = req.num_computed_tokens
            num_new = min(req.num_tokens - start, budget)
            if (num_new > 1 and len(out.prefills) >= cfg.max_num_prefill_seqs) or not (
                self.kv_cache.allocate_slots(req.request_id, start + num_new, write_from=start)
            ):
                if start and req.request_id in self.kv_cache.block_tables:  # give the cached pages back
                    self.kv_cache.free(req.request_id)
                    req.num_computed_tokens = 0
                break
            self.waiting.pop()
            self.kv_cache.record_prefix_query(req.num_tokens, start)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_chunk(out, req, num_new, scheduled)
            budget -= num_new
        return out

    # ---------------------------------------------------------------------------------- step results
    def update_from_output(self, out: SchedulerOutput, model_out: ModelOutput) -> list[RequestUpdate]:
        """Apply one executed step: advance computed tokens, mark and cache filled pages, append the
        new tokens (one, or with speculative decoding the verified drafts plus a bonus token), roll
        back rejected draft slots, check stop conditions and finish requests (freeing their pages).

        Returns one RequestUpdate per request that got tokens or finished. Stop strings are found by
        the engine's output processor (they need detokenized text), which then calls `finish`."""
        self._share_forked_pages(out)
        bs = self.kv_cache.block_size
        updates: list[RequestUpdate] = []
        for ch in out.chunks:
            req = ch.request
            rid = req.request_id
            if req.is_finished:  # finished by an earlier chunk's outcome (e.g. its source's abort)
                continue
            new_tokens = model_out.sampled.get(rid, []) if ch.samples else []
            if len(new_tokens) > ch.num_spec_tokens + 1:
                raise ValueError(
                    f"{rid}: {len(new_tokens)} new tokens for a chunk with {ch.num_spec_tokens} drafts"
                )
            # Verified drafts come back as new tokens (all but the last, the bonus token); the rest
            # are rejected and their K/V slots rolled back.
            accepted = max(len(new_tokens) - 1, 0)
            if new_tokens[:accepted] != req.spec_token_ids[:accepted]:
                raise ValueError(f"{rid}: new tokens {new_tokens} do not extend its drafts")
            rejected = ch.num_spec_tokens - accepted
            computed = ch.end - rejected
            req.num_computed_tokens = computed
            if computed // bs > ch.start // bs:  # a page filled up (verified tokens only): findable
                self.kv_cache.cache_full_pages(rid, computed, req.token_ids_slice(0, computed))
            req.spec_token_ids = []
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
            for idx, lp in model_out.prompt_logprobs.get(rid, ()):
                if req.prompt_logprobs is not None and idx == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(lp)
            if rejected:
                self.kv_cache.truncate(rid, computed)
            self.kv_cache.mark_filled(rid, computed)
            if not new_tokens:
                continue
            logprobs = model_out.logprobs.get(rid)
            if req.hold_samples:  # a beam: the beam controller picks its continuation
                req.held_logprobs = logprobs[0] if logprobs else None
                continue
            update = RequestUpdate(
                rid, [], [] if logprobs is not None else None, num_rejected_tokens=rejected
            )
            for k, token in enumerate(new_tokens):
                req.output_token_ids.append(token)
                update.new_token_ids.append(token)
                if logprobs is not None:
                    req.logprobs.append(logprobs[k])
                    update.new_logprobs.append(logprobs[k])
                status = self._stop_status(req, token)
                if status is not None:
                    update.finish_reason, update.stop_reason = status.value, req.stop_reason
                    self.finish(req, status)
                    break
            updates.append(update)
        return updates

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        """Whether appending `token` ends the request (stop strings are checked by the engine)."""
        sp = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens:
            if token in sp.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not sp.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def fail_step(self, out: SchedulerOutput) -> list[Request]:
        """The step could not be executed: finish its requests with an error (pages freed) so the
        engine can go on serving the others. Page copies queued for the step are dropped with it."""
        failed = []
        self.kv_cache.take_pending_copies()
        for ch in out.chunks:
            if not ch.request.is_finished:
                self.finish(ch.request, RequestStatus.FINISHED_ERROR)
                failed.append(ch.request)
        return failed

    def check_invariants(self) -> None:
        self.kv_cache.check_invariants()
        ids = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        ids += [s.request_id for samples in self.pending_forks.values() for s in samples]
        assert len(ids) == len(set(ids)), "a request is both running and waiting"
        assert set(ids) == set(self.requests), "scheduler lost track of a request"
        for rid in self.kv_cache.block_tables:
            assert rid in {r.request_id for r in self.running}, f"{rid} holds pages but is not running"
