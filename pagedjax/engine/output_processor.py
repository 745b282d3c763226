"""From scheduler updates to what users read: detokenized text, stop strings, logprobs, n/best_of
parents, and `RequestOutput` objects (cumulative, with a streaming delta view on top of them).

The scheduler knows sequences (`Request`s); users know requests that may own several sequences
(n > 1, best_of, beams). This module keeps that mapping, one `ParentRequest` per user request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedjax.core.model_output import RequestUpdate
from pagedjax.core.request import Request, RequestStatus
from pagedjax.engine.detokenizer import IncrementalDetokenizer
from pagedjax.metrics import EngineMetrics
from pagedjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedjax.sampling_params import SamplingParams


@dataclass
class ParentRequest:
    """A user request; it owns n (or best_of) child sequences that the scheduler runs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float
    num_cached_tokens: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    """Owns the user-request view. `finish_sequence(req, status)` ends a sequence in the scheduler
    (called when a stop string appears in the detokenized text)."""

    def __init__(
        self,
        tokenizer: Any,
        metrics: EngineMetrics,
        finish_sequence: Callable[[Request, RequestStatus], None],
    ):
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.finish_sequence = finish_sequence
        self.parents: dict[str, ParentRequest] = {}
        self.parent_of: dict[str, str] = {}  # sequence (child) id -> user request id

    # ------------------------------------------------------------------------------ bookkeeping
    def new_detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            params.skip_special_tokens,
            params.stop,
            params.include_stop_str_in_output,
        )

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent
        for child in parent.children:
            self.parent_of[child.request_id] = parent.request_id
        self.metrics.on_request_added(len(parent.prompt_token_ids))

    def remove(self, request_id: str) -> ParentRequest | None:
        parent = self.parents.pop(request_id, None)
        if parent is not None:
            for child in parent.children:
                self.parent_of.pop(child.request_id, None)
        return parent

    # ------------------------------------------------------------------------------ per step
    def process(self, updates: list[RequestUpdate], final_only: bool) -> list[RequestOutput]:
        """Detokenize the step's new tokens, apply stop strings, and build the outputs of the user
        requests that progressed (only finished ones with `final_only`: building a cumulative output
        for every running request copies its token list each step, host time that shows)."""
        touched: dict[str, ParentRequest] = {}
        for update in updates:
            pid = self.parent_of.get(update.request_id)
            if pid is None:
                continue
            parent = self.parents[pid]
            index = next(i for i, c in enumerate(parent.children) if c.request_id == update.request_id)
            self._detokenize(parent.children[index], parent.detoks[index], update)
            touched[pid] = parent
        outputs = []
        for parent in touched.values():
            if parent.finished:
                self._count_finished(parent)
                outputs.append(self.make_output(parent))
                self.remove(parent.request_id)
            elif not final_only:
                outputs.append(self.make_output(parent))
        return outputs

    def _detokenize(self, req: Request, detok: IncrementalDetokenizer, update: RequestUpdate) -> None:
        sp = req.sampling_params
        if req.first_token_time is None:
            req.first_token_time = time.time()
        first_out = req.num_output_tokens - len(update.new_token_ids)
        for k, token in enumerate(update.new_token_ids):
            stop_str = detok.add_token(token)
            if stop_str is None or first_out + k + 1 < sp.min_tokens:
                continue
            last = k == len(update.new_token_ids) - 1
            if last and req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is not None:
                return  # a stop token ended it on this very token: that reason wins
            if not last:  # several tokens this step (speculative decoding): none past the stop string
                del req.output_token_ids[first_out + k + 1 :]
                del update.new_token_ids[k + 1 :]
                if req.logprobs is not None and update.new_logprobs is not None:
                    del req.logprobs[first_out + k + 1 :]
                    del update.new_logprobs[k + 1 :]
            req.stop_reason = stop_str
            if req.is_finished:  # ended by length on this token: the stop string wins (as in vLLM)
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.finish_sequence(req, RequestStatus.FINISHED_STOPPED)
            return

    def _count_finished(self, parent: ParentRequest) -> None:
        last = max(parent.children, key=lambda c: c.finished_time or 0.0)
        self.metrics.on_request_finished(last.finish_reason or "abort", parent, last)

    def fail(self, request_ids: list[str], error: str) -> list[RequestOutput]:
        """End user requests whose step failed: every sequence of theirs is finished with an error
        (pages freed) and each gets a final output carrying `error`."""
        outputs = []
        now = time.time()
        for pid in dict.fromkeys(self.parent_of.get(r) for r in request_ids):
            parent = self.parents.get(pid) if pid is not None else None
            if parent is None:
                continue
            parent.error = error
            for child in parent.children:
                if not child.is_finished:
                    self.finish_sequence(child, RequestStatus.FINISHED_ERROR)
                child.finished_time = child.finished_time or now
            self.metrics.on_request_finished("error", parent)
            outputs.append(self.make_output(parent))
            self.remove(pid)
        return outputs

    # ------------------------------------------------------------------------------ outputs
    def make_output(self, parent: ParentRequest) -> RequestOutput:
        sp = parent.params
        outs = []
        for i, (child, detok) in enumerate(zip(parent.children, parent.detoks, strict=True)):
            cum = (
                float(sum(lp[t] for lp, t in zip(child.logprobs, child.output_token_ids, strict=False)))
                if child.logprobs
                else None
            )
            outs.append(
                CompletionOutput(
                    index=i,
                    text=detok.text,
                    token_ids=list(child.output_token_ids),
                    cumulative_logprob=cum,
                    logprobs=list(child.logprobs) if sp.logprobs is not None else None,
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        finished = parent.finished
        if sp.best_of and sp.best_of > sp.n and parent.error is None:
            if not finished:
                outs = []
            else:
                outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[: sp.n]
                for i, o in enumerate(outs):
                    o.index = i
        first = parent.children[0]
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_scheduled_time=min(
                (c.first_scheduled_time for c in parent.children if c.first_scheduled_time is not None),
                default=None,
            ),
            first_token_time=min(
                (c.first_token_time for c in parent.children if c.first_token_time is not None), default=None
            ),
            finished_time=max((c.finished_time or 0.0) for c in parent.children) if finished else None,
            num_preemptions=sum(c.num_preemptions for c in parent.children),
        )
        parent.num_cached_tokens = first.num_cached_tokens or 0
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=metrics,
            num_cached_tokens=parent.num_cached_tokens,
            error=parent.error,
        )
