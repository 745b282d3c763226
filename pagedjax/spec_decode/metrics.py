"""Counters of speculative decoding, for `get_metrics()` and Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeMetrics:
    num_drafts: int = 0  # verified chunks that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j
    drafted_per_position: list[int] = field(default_factory=list)  # [j]: drafts verified at position j
    proposal_seconds: float = 0.0
    verification_seconds: float = 0.0  # wall time of steps that verified drafts
    num_disabled_steps: int = 0  # steps with drafting switched off by disable_by_batch_size

    def on_verified(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        while len(self.drafted_per_position) < num_drafts:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for j in range(num_drafts):
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += j < num_accepted

    def snapshot(self) -> dict:
        """Flat `spec_*` entries of `get_metrics()`. Mean accepted length counts the bonus token
        (tokens emitted per verified chunk, as vLLM reports it)."""
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens
            if self.num_draft_tokens
            else 0.0,
            "spec_mean_accepted_length": 1 + self.num_accepted_tokens / self.num_drafts
            if self.num_drafts
            else 0.0,
            "spec_acceptance_rate_per_position": [
                a / d if d else 0.0
                for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)
            ],
            "spec_drafted_per_position": list(self.drafted_per_position),
            "spec_accepted_per_position": list(self.accepted_per_position),
            "spec_proposal_seconds": self.proposal_seconds,
            "spec_verification_seconds": self.verification_seconds,
            "spec_num_disabled_steps": self.num_disabled_steps,
        }
