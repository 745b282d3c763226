"""Prompt-lookup (n-gram) proposals: continue the sequence the way it continued the last time its
most recent n tokens appeared in the request's own prompt + output. No second model; host only.

Pays off where the answer repeats its input (editing code, quoting, summarising): there the
continuation after a repeated n-gram is often copied verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pagedjax.core.model_output import ModelOutput
from pagedjax.core.request import Request
from pagedjax.spec_decode.proposer import Proposer


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    of length n_max down to n_min (vLLM's prompt lookup, most recent match). [] when none matches."""
    total = len(tokens)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        suffix = tokens[total - n :]
        # Candidate starts: every window but the suffix itself, scanned with one vectorised compare.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        super().__init__(num_speculative_tokens)
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max

    def propose(self, requests: Sequence[Request], last_output: ModelOutput | None) -> dict[str, list[int]]:
        out = {}
        for req in requests:
            tokens = np.asarray(req.prompt_token_ids + req.output_token_ids, np.int32)
            draft = ngram_lookup(tokens, self.k, self.n_min, self.n_max)
            if draft:
                out[req.request_id] = draft
        return out
