"""Beam-search selection on the host, step for step the algorithm of HF transformers' `_beam_search`
(early_stopping=False), so that outputs can be compared token for token.

The device only supplies, for every live beam, the top-K log-softmax values of its next-token logits
(K = max(2, 1 + #eos) * beam_width is enough: the best K candidates over all beams can take at most K
from one beam). Everything else — accumulating scores, moving finished hypotheses into a ranked
set with the length penalty, the early-stop heuristic — is a few numpy lines per step here. Scores
are float32, as in HF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_PENALTY = np.float32(-1.0e9)  # HF's "minus infinity" for beams that must not be picked


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens (without the prompt)
    score: float  # cumulative logprob / generated_length ** length_penalty
    cumulative_logprob: float
    finished: bool = True


@dataclass
class BeamSearchState:
    """The running and finished beams of one prompt."""

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    # Running beams: generated tokens and cumulative logprob. Before the first step there is one beam
    # (HF starts with beam_width copies of the prompt, all but one at -1e9, which is the same thing).
    running: list[list[int]] = field(default_factory=lambda: [[]])
    running_scores: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))
    finished: list[Hypothesis] = field(default_factory=list)
    improvement_possible: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        k = self.beam_width
        self.finished = [Hypothesis([], float(_PENALTY), float(_PENALTY), finished=False) for _ in range(k)]

    @property
    def num_candidates(self) -> int:
        """Top-K logprobs needed per beam and step."""
        return max(2, 1 + len(self.eos_token_ids)) * self.beam_width

    @property
    def generated_len(self) -> int:
        return len(self.running[0])

    def step(self, top_logprobs: list[dict[int, float]]) -> list[tuple[int, int]]:
        """Advance by one token. `top_logprobs[b]`: {token: logprob} (at least `num_candidates`
        entries) for running beam b. Returns the new running beams as (source beam, token) pairs
        (empty when the search is done)."""
        assert len(top_logprobs) == len(self.running) and not self.done
        k, K = self.beam_width, self.num_candidates
        cur = self.generated_len  # tokens generated so far (HF: cur_len - prompt_len)
        # All candidates, ranked like torch.topk over the flattened [beams * vocab] scores.
        cands = []
        for b, lps in enumerate(top_logprobs):
            for tok, lp in lps.items():
                cands.append((np.float32(self.running_scores[b] + np.float32(lp)), b, tok))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:K]
        hits = np.array(
            [tok in self.eos_token_ids or cur + 1 >= self.max_tokens for _, _, tok in cands], dtype=bool
        )
        scores = np.array([c[0] for c in cands], np.float32)

        # Next running beams: the best k candidates that did not stop.
        running_scores = scores + hits.astype(np.float32) * _PENALTY
        order = sorted(range(len(cands)), key=lambda i: (-running_scores[i], i))[:k]
        new_running = [(cands[i][1], cands[i][2]) for i in order]
        new_tokens = [self.running[b] + [tok] for b, tok in new_running]
        new_scores = running_scores[order]

        # Finished hypotheses: stopping candidates among the top k, length-normalised, merged with
        # the ones kept so far; the best k stay.
        norm = scores / np.float32((cur + 1) ** self.length_penalty)
        just_finished = hits & (np.arange(len(cands)) < k)
        norm = norm + (~just_finished).astype(np.float32) * _PENALTY
        if not self.improvement_possible:
            norm = norm + _PENALTY
        merged = list(self.finished) + [
            Hypothesis(
                self.running[b] + [tok], float(norm[i]), float(scores[i]), finished=bool(just_finished[i])
            )
            for i, (_, b, tok) in enumerate(cands)
        ]
        ranked = sorted(range(len(merged)), key=lambda i: (-np.float32(merged[i].score), i))[:k]
        self.finished = [merged[i] for i in ranked]

        self.running, self.running_scores = new_tokens, new_scores
        # HF's early-stop heuristic (early_stopping=False): stop once the best running beam, scored
        # at its current length, cannot beat the worst kept hypothesis.
        best_possible = np.float32(new_scores[0] / np.float32((cur + 1) ** self.length_penalty))
        worst = min(np.float32(h.score) for h in self.finished)
        self.improvement_possible &= any(
            best_possible > (worst if h.finished else _PENALTY) for h in self.finished
        )
        self.done = not self.improvement_possible or bool(hits.all())
        return [] if self.done else new_running

    def best(self) -> list[Hypothesis]:
        """Finished hypotheses, best first."""
        return [h for h in self.finished if h.finished]
