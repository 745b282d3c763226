"""Shape buckets: every step is padded up to one of a few static shapes, so XLA compiles a bounded
number of programs (one per (decode rows, prefill tokens) pair) and warm-up can compile them all."""

from __future__ import annotations

from dataclasses import dataclass


def power_of_two_buckets(lo: int, hi: int) -> list[int]:
    """lo, 2*lo, 4*lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return out


def round_up(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} is larger than the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepShape:
    decode_rows: int  # D: decode query rows (one token each)
    prefill_tokens: int  # Tq: packed prefill query rows
    prefill_seqs: int  # Sp: prefill sequences the metadata has room for
    spec_tokens: int = 0  # k: draft tokens a chunk may carry (speculative decoding), else 0
    spec_seqs: int = 0  # most chunks of one step that carry drafts (the scheduler keeps to it)

    @property
    def num_tokens(self) -> int:
        return self.decode_rows + self.prefill_tokens

    @property
    def num_prefill_sample_rows(self) -> int:
        """Logits rows of the prefill part: one per chunk, plus one per draft token to verify. A
        chunk's drafts are its own tokens, so Tq bounds the total as well as Sp + (speculating
        chunks) * k does; padding rows cost little (the LM head skips them) but not nothing."""
        if not self.spec_tokens:
            return self.prefill_seqs
        return min(self.prefill_tokens, self.prefill_seqs + self.spec_seqs * self.spec_tokens)

    @property
    def num_sample_rows(self) -> int:
        return self.decode_rows + self.num_prefill_sample_rows


class BucketPolicy:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_num_prefill_seqs: int,
        min_decode_bucket: int = 8,
        min_prefill_bucket: int = 16,
        spec_tokens: int = 0,
        spec_seqs: int = 0,
    ):
        self.spec_tokens, self.spec_seqs = spec_tokens, spec_seqs
        self.decode_buckets = [0, *power_of_two_buckets(min(min_decode_bucket, max_num_seqs), max_num_seqs)]
        self.prefill_buckets = [
            0,
            *power_of_two_buckets(min(min_prefill_bucket, max_num_batched_tokens), max_num_batched_tokens),
        ]
        self.max_num_prefill_seqs = max_num_prefill_seqs

    def shape_for(self, num_decodes: int, num_prefill_tokens: int) -> StepShape:
        tq = round_up(num_prefill_tokens, self.prefill_buckets)
        d = round_up(num_decodes, self.decode_buckets)
        return StepShape(d, tq, min(self.max_num_prefill_seqs, tq), self.spec_tokens, self.spec_seqs)

    def all_shapes(self) -> list[StepShape]:
        return [
            StepShape(d, t, min(self.max_num_prefill_seqs, t), self.spec_tokens, self.spec_seqs)
            for d in self.decode_buckets
            for t in self.prefill_buckets
            if d or t
        ]
