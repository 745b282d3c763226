"""A request's state as the scheduler sees it: its tokens and how many of them are computed.

There is no prefill or decode phase: a request has `num_tokens` (prompt + generated) and
`num_computed_tokens` (those whose K/V are in the page pool). Each step lets the second catch up
with the first under the token budget; when it has caught up, the step's logits at its last token
give the next generated token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pagedjax.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine step computing it failed (the fault is the engine's)

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # effective sampling seed (the request's own, or one drawn from the engine's RNG)
    max_tokens: int  # resolved: never None
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Timestamps (seconds, time.time()) for per-request metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Sampler side outputs, one entry per generated token / prompt position.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Prefix caching: requests only share cached pages when their salts are equal.
    cache_salt: str | None = None
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    # Seats in the running batch this request holds for sequences that will fork from it (n > 1
    # samples, beams), so that forking never overflows max_num_seqs.
    num_reserved_seats: int = 0
    # Beam search: the engine does not append sampled tokens; it keeps the step's top logprobs in
    # `held_logprobs` for the beam controller to choose continuations from.
    hold_samples: bool = False
    held_logprobs: dict[int, float] | None = None
    # Speculative decoding: draft tokens proposed after the last generated token. They are not
    # part of `num_tokens` until verified; the scheduler computes them with the next chunk and
    # `Scheduler.update_from_output` keeps the verified ones and rolls the rest back.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        """Token i of prompt + output, without building the joined list."""
        p = self.num_prompt_tokens
        if i < p:
            return self.prompt_token_ids[i]
        i -= p
        n = len(self.output_token_ids)
        return self.output_token_ids[i] if i < n else self.spec_token_ids[i - n]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output + draft tokens."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids + self.spec_token_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
