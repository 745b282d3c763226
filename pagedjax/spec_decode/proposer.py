"""The proposer interface: what the engine asks for draft tokens after each step.

A proposer sees the running requests that are decoding (their prompt + output so far) and returns
up to `num_speculative_tokens` draft tokens for some of them. The scheduler then schedules each such
request's last token plus its drafts as one short chunk, the runner scores every position in the
same ragged step as everything else, and the sampler keeps the verified prefix plus one token of
its own (`pagedjax/spec_decode/verify.py`).

Host proposers (n-gram) need nothing else. Device proposers (a draft model, an EAGLE-style head over
the target's hidden states) get the last `ModelOutput` too, where a later runner can put hidden
states, so they fit without touching the scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pagedjax.core.model_output import ModelOutput
from pagedjax.core.request import Request


class Proposer(ABC):
    """Draft tokens for decoding requests. Proposals must be deterministic given the request's
    tokens (the sampler's verification is exact rejection sampling for a point-mass proposal)."""

    # Device proposers that draft into the step's freshly allocated pages set this: the engine then
    # calls `fill` between scheduling and running the step.
    drafts_after_scheduling = False

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens

    @abstractmethod
    def propose(self, requests: Sequence[Request], last_output: ModelOutput | None) -> dict[str, list[int]]:
        """request id -> 1..k draft tokens; requests without a proposal are left out."""

    def fill(self, sched_out, runner, block_tables: dict[str, list[int]]) -> None:
        """Compute the drafts of the scheduled chunks (proposers with `drafts_after_scheduling`)."""
        return None

    def warmup(self, runner, max_rows: int) -> None:
        """Compile whatever the proposer runs on the device, at start-up."""
        return None
