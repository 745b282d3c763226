"""Host-side (NumPy) construction of :class:`SamplingTensors` and :class:`SamplerFlags`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pagedjax.sampling.sampler import SamplerFlags, SamplingTensors
from pagedjax.sampling_params import MAX_LOGPROBS, SamplingParams

__all__ = ["SamplingRow", "build_sampling_tensors", "bucket_width", "logprobs_bucket"]

# Smallest non-zero width of the padded id arrays (prompt/output/blocked/bias).
MIN_ID_BUCKET = 16


class SamplingRow(NamedTuple):
    """One sequence to sample for.

    ``seed``: the request's effective seed (the engine draws one when ``params.seed`` is None; give
    each of a request's n/best_of sequences its own). ``blocked_ids``: tokens to forbid this step
    (the engine passes EOS + ``stop_token_ids`` while fewer than ``min_tokens`` were generated).
    ``counter``: RNG step counter; defaults to ``len(output_ids)``.
    """

    params: SamplingParams
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    seed: int = 0
    blocked_ids: Sequence[int] = ()
    counter: int | None = None


def bucket_width(n: int, minimum: int = MIN_ID_BUCKET) -> int:
    """0 for 0, else the next power of two >= max(n, minimum)."""
    if n <= 0:
        return 0
    return 1 << (max(n, minimum) - 1).bit_length()


def logprobs_bucket(n: int) -> int:
    """Width of the top-N logprobs output for a largest request of ``n``: 0, 1, 2, 4, 8, 16 or 20."""
    if n <= 0:
        return 0
    return min(1 << (n - 1).bit_length(), MAX_LOGPROBS)


def _pad_ids(seqs: Sequence[Sequence[int]], num_rows: int, width: int) -> np.ndarray:
    out = np.full((num_rows, width), -1, np.int32)
    if width:
        for i, seq in enumerate(seqs):
            if len(seq):
                out[i, : len(seq)] = np.asarray(seq, np.int32)
    return out


def build_sampling_tensors(
    rows: Sequence[SamplingRow], num_rows_padded: int
) -> tuple[SamplingTensors, SamplerFlags]:
    """Pack ``rows`` into ``num_rows_padded`` rows of NumPy arrays plus the static flags.

    Padded rows are greedy with no penalties/bias/blocking. Id-array widths are bucketed
    (:func:`bucket_width`) so ``sample`` recompiles a bounded number of times; arrays a disabled stage
    does not read have width 0 (``prompt_ids`` is only shipped when some row has a repetition
    penalty, ``output_ids`` when some row has any penalty). ``flags.num_logprobs`` is
    :func:`logprobs_bucket` of the largest ``params.logprobs``; slice ``topk_*[r, :params.logprobs]``.
    """
    s = int(num_rows_padded)
    if len(rows) > s:
        raise ValueError(f"num_rows_padded ({s}) < number of rows ({len(rows)})")

    temperature = np.zeros(s, np.float32)  # padded rows: greedy
    top_k = np.zeros(s, np.int32)
    top_p = np.ones(s, np.float32)
    min_p = np.zeros(s, np.float32)
    rep = np.ones(s, np.float32)
    pres = np.zeros(s, np.float32)
    freq = np.zeros(s, np.float32)
    seeds = np.zeros(s, np.uint32)
    counters = np.zeros(s, np.int32)

    any_rep = any_pen = any_topkp = any_minp = False
    all_greedy = True
    max_logprobs = 0
    want_token_lp = False
    for i, row in enumerate(rows):
        p = row.params
        temperature[i] = p.temperature
        rep[i] = p.repetition_penalty
        pres[i] = p.presence_penalty
        freq[i] = p.frequency_penalty
        seeds[i] = int(row.seed) % (1 << 32)
        counters[i] = len(row.output_ids) if row.counter is None else int(row.counter)
        any_rep |= p.repetition_penalty != 1.0
        any_pen |= p.has_penalties
        if not p.greedy:
            all_greedy = False
            top_k[i] = p.top_k
            top_p[i] = p.top_p
            min_p[i] = p.min_p
            any_topkp |= p.top_k > 0 or p.top_p < 1.0
            any_minp |= p.min_p > 0.0
        if p.logprobs:
            max_logprobs = max(max_logprobs, p.logprobs)
        want_token_lp |= p.logprobs is not None or (p.best_of or 1) > p.n

    lp = bucket_width(max(len(r.prompt_ids) for r in rows)) if any_rep and rows else 0
    lo = bucket_width(max(len(r.output_ids) for r in rows)) if any_pen and rows else 0
    prompt_ids = _pad_ids([r.prompt_ids if r.params.repetition_penalty != 1.0 else () for r in rows], s, lp)
    output_ids = _pad_ids([r.output_ids if r.params.has_penalties else () for r in rows], s, lo)

    kb = bucket_width(max((len(r.blocked_ids) for r in rows), default=0))
    blocked_ids = _pad_ids([r.blocked_ids for r in rows], s, kb)

    nb = bucket_width(max((len(r.params.logit_bias or ()) for r in rows), default=0))
    bias_ids = np.full((s, nb), -1, np.int32)
    bias_values = np.zeros((s, nb), np.float32)
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            items = list(r.params.logit_bias.items())
            bias_ids[i, : len(items)] = [k for k, _ in items]
            bias_values[i, : len(items)] = [v for _, v in items]

    tensors = SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        seeds=seeds,
        counters=counters,
        prompt_ids=prompt_ids,
        output_ids=output_ids,
        blocked_ids=blocked_ids,
        bias_ids=bias_ids,
        bias_values=bias_values,
    )
    flags = SamplerFlags(
        do_penalties=any_pen,
        do_top_k_top_p=any_topkp,
        do_min_p=any_minp,
        do_blocked=kb > 0,
        do_bias=nb > 0,
        num_logprobs=logprobs_bucket(max_logprobs),
        all_greedy=all_greedy,
        token_logprobs=want_token_lp,
    )
    return tensors, flags
