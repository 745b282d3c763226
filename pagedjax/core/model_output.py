"""What one executed step hands back to the scheduler: plain host data, keyed by request id.

The runner fills it; `Scheduler.update_from_output` consumes it. Keeping it here (host-only, no JAX)
lets the scheduler be tested with a simulated runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModelOutput:
    # request id -> new tokens, in order. One for a plain sampling chunk; with speculative decoding
    # the verified draft tokens plus the bonus token (1 .. k+1). Chunks that do not reach their
    # request's last token (a prefill chunk mid-prompt) have no entry.
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # request id -> one {token: logprob} per new token, when the request asked for logprobs.
    logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    # request id -> [(prompt index i, {token: logprob}) for prompt tokens i >= 1 covered this step]
    prompt_logprobs: dict[str, list[tuple[int, dict[int, float]]]] = field(default_factory=dict)
    # With ModelRunner.capture_logits: request id -> (first position, f32[num_new_tokens, V] logits).
    logits: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


@dataclass
class RequestUpdate:
    """What one step did to one request, as `Scheduler.update_from_output` reports it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", ... when the request finished this step
    stop_reason: int | str | None = None
    num_rejected_tokens: int = 0  # speculative draft tokens rolled back this step
