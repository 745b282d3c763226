"""Verification of draft tokens against the target's own samples.

The runner samples the target at every verified position j (0..s) with the request's full sampling
pipeline (penalties, bias, temperature, top-k/top-p/min-p) over the sequence *with* drafts 1..j, and
with the RNG counter of output position n_out + j, exactly as a step without speculation would at
that position. Draft j+1 is accepted while it equals that sample; the first sample that differs (or
the sample after the last draft) is the step's bonus token.

Why this is exact: for a point-mass proposal q = δ(d) (every proposer here is deterministic),
Leviathan et al.'s rejection rule accepts d with probability min(1, p(d)/q(d)) = p(d) and otherwise
resamples from norm(max(p - q, 0)) = p restricted to tokens != d; drawing x ~ p and accepting iff
x == d has those same two probabilities. Greedy is the case p = δ(argmax). And because position j's
random draw is the one the plain engine would make there, a seeded request produces the same tokens
with or without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence


def verified_tokens(drafts: Sequence[int], target: Sequence[int]) -> list[int]:
    """The tokens a step emits: the drafts that equal the target's samples, then the target's
    sample at the first mismatch (or after the last draft). len(target) == len(drafts) + 1."""
    if len(target) != len(drafts) + 1:
        raise ValueError(f"{len(target)} target samples for {len(drafts)} drafts")
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return list(target[: n + 1])
