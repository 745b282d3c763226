"""Batched, jit-compiled token sampler with vLLM semantics.

Pipeline for a batch of S rows over a vocabulary of V tokens::

    raw logits --process_logits--> processed --filter_logits--> filtered --sample--> token
     (logprobs)   penalties, logit bias,        temperature,
                  blocked ids (min_tokens)      top-k, top-p, min-p

* Greedy rows (``temperature < SAMPLING_EPS``) take the first argmax of the *processed* logits.
* Random rows draw one uniform number ``u`` from a key derived only from ``(seed_r, counter_r)`` and
  take the inverse CDF of the *filtered* distribution at ``u``. So a seeded request produces the same
  tokens whatever else is in the batch and at whatever row position it sits. (One uniform per row is
  much cheaper on CPU than one Gumbel per vocabulary entry; the sampled distribution is the same.)
* Logprobs are those of the raw model logits (vLLM's default ``logprobs_mode``), for the sampled token
  and for the top-N tokens.

Top-k/top-p are computed without sorting the vocabulary: the top ``num_candidates`` logits of each
row (``lax.top_k``) decide both thresholds exactly in the common case; rows whose answer is not
contained in the candidates (large ``top_k``, very flat distributions) fall back to an exact 32-step
bisection over the float bit patterns, behind a ``lax.cond`` so the fast path pays nothing for it.
Both filters are value thresholds: tokens tied with the k-th largest logit are kept (as in vLLM), and
top-p keeps the smallest prefix of the descending order whose mass is ``>= top_p`` plus any token tied
with the last one kept (vLLM breaks such exact ties by sort order). At least one token always survives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pagedjax.sampling_params import SAMPLING_EPS
from pallas_kernels.cpu import inverse_cdf as cpu_inverse_cdf
from pallas_kernels.cpu.top_k import top_k_values

__all__ = [
    "TOP_CANDIDATES",
    "SamplerFlags",
    "SamplerOutput",
    "SamplingTensors",
    "compute_logprobs",
    "filter_logits",
    "process_logits",
    "row_keys",
    "sample",
]

# Number of per-row candidates (largest logits) used for the sort-free top-k/top-p fast path.
TOP_CANDIDATES = 256
# Rows per group of the exact top-k/top-p fallback: only the rows whose answer is not inside the
# candidates are bisected, `FALLBACK_ROWS` at a time. (Bisecting the whole batch whenever one row
# needed it cost ~280 ms per 256-row step on SmolLM2's 49k vocabulary at temperature 0.8 /
# top_p 0.95, where ~4% of real rows need more than 256 candidates: nearly every step had one.)
FALLBACK_ROWS = 8

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling state for S (padded) rows; all leaves are arrays with leading dim S.

    Id arrays are padded with -1; ids outside ``[0, V)`` are ignored. Penalty id arrays may have
    zero width when penalties are off.
    """

    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S], 0 = disabled
    top_p: jax.Array  # f32[S], 1 = disabled
    min_p: jax.Array  # f32[S], 0 = disabled
    repetition_penalty: jax.Array  # f32[S], 1 = disabled
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    seeds: jax.Array  # u32[S]
    counters: jax.Array  # i32[S]: tokens generated so far by the row's sequence
    prompt_ids: jax.Array  # i32[S, Lp] (repetition penalty)
    output_ids: jax.Array  # i32[S, Lo] (repetition, presence, frequency penalties)
    blocked_ids: jax.Array  # i32[S, K] forced to -inf
    bias_ids: jax.Array  # i32[S, B]
    bias_values: jax.Array  # f32[S, B]


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static (hashable) switches; each disabled stage is compiled out."""

    do_penalties: bool = False
    do_top_k_top_p: bool = False
    do_min_p: bool = False
    do_blocked: bool = False
    do_bias: bool = False
    num_logprobs: int = 0  # width N of the returned top-N logprobs; 0 = none
    all_greedy: bool = True
    # Whether some row reads the sampled token's logprob (logprobs requested, or best_of > n
    # ranking). Off: token_logprobs are zeros and the log-softmax over the vocabulary (a few passes
    # over [rows, vocab] every step) is compiled out.
    token_logprobs: bool = True


class SamplerOutput(NamedTuple):
    tokens: jax.Array  # i32[S]
    token_logprobs: jax.Array  # f32[S], raw-logit logprob of the sampled token
    topk_ids: jax.Array  # i32[S, N], descending
    topk_logprobs: jax.Array  # f32[S, N]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _scatter_index(ids: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(row index, column index) for ``.at[]`` with padding/out-of-range ids sent out of bounds."""
    rows = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
    cols = jnp.where((ids >= 0) & (ids < vocab), ids, vocab).astype(jnp.int32)
    return rows, cols


def _first_argmax(x: jax.Array, chunk: int = 256) -> jax.Array:
    """First index of the row maximum of x [S, V] (torch/numpy tie rule); an all-NaN row -> V - 1.

    Two stages because XLA:CPU's fused `min(where(x == max, iota, V))` over a whole vocabulary row
    runs ~6x slower than a plain max: chunk maxima [S, V / chunk] first, then the first chunk that
    holds the row maximum, then the first match inside that one chunk (2.3 -> 0.9 ms on [64, 32000]
    here, every greedy step)."""
    s, v = x.shape
    chunk = min(chunk, v)  # a short vocabulary needs no padding
    nc = -(-v // chunk)
    xp = jnp.pad(x, ((0, 0), (0, nc * chunk - v)), constant_values=-jnp.inf).reshape(s, nc, chunk)
    chunk_max = jnp.max(xp, axis=-1)  # [S, nc]
    m = jnp.max(chunk_max, axis=-1)  # [S]
    first_chunk = _first_true(chunk_max == m[:, None])
    inside = jnp.take_along_axis(xp, first_chunk[:, None, None], axis=1)[:, 0] == m[:, None]  # [S, chunk]
    idx = first_chunk * chunk + _first_true(inside)
    # Padding is -inf and sits after every real column, so it is never the first match of a real max.
    # No match at all: an all-NaN row (XLA:CPU's max reduction drops NaNs, so m is not NaN there).
    return jnp.where(jnp.any(inside, axis=-1), jnp.minimum(idx, v - 1), v - 1).astype(jnp.int32)


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True along the last axis (0 when there is none)."""
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _is_greedy(t: SamplingTensors) -> jax.Array:
    return t.temperature < SAMPLING_EPS


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Per-row PRNG keys; row r's key depends only on ``(seeds[r], counters[r])``."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
        seeds.astype(jnp.uint32), counters.astype(jnp.int32)
    )


# Monotone map float32 -> uint32 (a < b  <=>  key(a) < key(b), for non-NaN values; -0 < +0).
def _f32_to_key(x: jax.Array) -> jax.Array:
    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def _key_to_f32(k: jax.Array) -> jax.Array:
    b = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return lax.bitcast_convert_type(b, jnp.float32)


def _bisect_threshold(x: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest value ``v`` of ``x`` with ``sum(weights[x >= v]) >= target``.

    Exact (bisection over the 2**32 ordered float bit patterns, 32 steps). If even the whole row's
    weight is below ``target``, -inf is returned (keep everything).
    """
    keys = _f32_to_key(x)
    s = x.shape[0]
    lo = jnp.zeros((s,), jnp.uint32)  # invariant: mass(lo) >= target (or nothing can satisfy it)
    hi = jnp.full((s,), 0xFFFFFFFF, jnp.uint32)  # invariant: mass(hi) < target

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0.0), axis=-1)
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    # lo is the key of an element of x (the mass only changes at element keys) or 0 (-> NaN below).
    thr = _key_to_f32(lo)
    return jnp.where(lo == 0, _NEG_INF, thr)


def _prefix_sum(x: jax.Array) -> jax.Array:
    """Inclusive prefix sum over the (short) last axis as one matmul with a triangular matrix.

    Compiles and runs faster on CPU than ``jnp.cumsum`` (an associative scan); full f32 precision.
    """
    n = x.shape[-1]
    tri = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.dot(x, tri, precision=lax.Precision.HIGHEST)


def _first_exceeding(mask: jax.Array, cs: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the first index with ``mask & (cs > target)``; else the last index with ``mask``."""
    n = mask.shape[-1]
    iota = lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    idx = jnp.min(jnp.where(mask & (cs > target[:, None]), iota, n), axis=-1)
    last = jnp.max(jnp.where(mask, iota, 0), axis=-1)
    return jnp.where(idx < n, idx, last)


def _inverse_cdf(
    x: jax.Array, thr: jax.Array, row_max: jax.Array, u: jax.Array, block: int = 256
) -> jax.Array:
    """Token at quantile ``u`` (in [0, 1)) of ``softmax(x)`` restricted to ``x >= thr``, per row.

    Never returns a masked token (``x < thr`` or ``x = -inf``); ``row_max`` is the row's maximum.
    Two levels so that no full-vocabulary prefix sum is needed (slow on CPU): block masses, then
    a prefix sum inside the one selected block of ``block`` tokens. ``u = 0`` gives the first token
    of maximal ``x`` when only the maximum is unmasked (greedy rows).
    """
    s, vocab = x.shape
    b = min(block, vocab)
    nb = -(-vocab // b)
    x = jnp.where(x >= thr[:, None], x, _NEG_INF)
    # Block masses (the padding is fused into the reduction, never materialised).
    xb = jnp.pad(x, ((0, 0), (0, nb * b - vocab)), constant_values=_NEG_INF).reshape(s, nb, b)
    bsum = jnp.sum(jnp.exp(xb - row_max[:, None, None]), axis=-1)  # f32[S, nb]
    bcs = _prefix_sum(bsum)
    total = bcs[:, -1]
    target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    blk = _first_exceeding(bsum > 0, bcs, target)  # a block with positive mass
    base = jnp.take_along_axis(bcs - bsum, blk[:, None], axis=1)[:, 0]
    mass = jnp.take_along_axis(bsum, blk[:, None], axis=1)[:, 0]
    # The selected block, gathered from the unpadded row.
    cols = blk[:, None] * b + lax.broadcasted_iota(jnp.int32, (s, b), 1)
    xg = jnp.take_along_axis(x, jnp.minimum(cols, vocab - 1), axis=1)
    w = jnp.where(cols < vocab, jnp.exp(xg - row_max[:, None]), 0.0)  # f32[S, b]
    t_in = jnp.clip(target - base, 0.0, jnp.nextafter(mass, 0.0))
    j = _first_exceeding(w > 0, _prefix_sum(w), t_in)
    return (blk * b + j).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# stage 1: penalties, logit bias, blocked ids
# --------------------------------------------------------------------------------------------------


def process_logits(logits: jax.Array, t: SamplingTensors, flags: SamplerFlags) -> jax.Array:
    """Penalties -> logit bias -> blocked ids. Greedy decoding takes the argmax of the result.

    * repetition penalty (tokens in prompt OR output): positive logits divided by it, negative ones
      multiplied by it;
    * frequency penalty: minus ``frequency_penalty * count(token in output)``;
    * presence penalty: minus ``presence_penalty * (token in output)``;
    * logit bias: plus ``bias_values`` at ``bias_ids``;
    * blocked ids: set to -inf.
    """
    x = logits.astype(jnp.float32)
    s, vocab = x.shape
    if flags.do_penalties:
        if t.output_ids.shape[1] > 0:
            r, c = _scatter_index(t.output_ids, vocab)
            counts = jnp.zeros((s, vocab), jnp.float32).at[r, c].add(1.0, mode="drop")
        else:
            counts = jnp.zeros((s, vocab), jnp.float32)
        in_output = counts > 0
        seen = in_output
        if t.prompt_ids.shape[1] > 0:
            r, c = _scatter_index(t.prompt_ids, vocab)
            in_prompt = jnp.zeros((s, vocab), jnp.bool_).at[r, c].set(True, mode="drop")
            seen = seen | in_prompt
        rp = t.repetition_penalty.astype(jnp.float32)[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rp, x * rp), x)
        x = x - t.frequency_penalty.astype(jnp.float32)[:, None] * counts
        x = x - t.presence_penalty.astype(jnp.float32)[:, None] * in_output.astype(jnp.float32)
    if flags.do_bias and t.bias_ids.shape[1] > 0:
        r, c = _scatter_index(t.bias_ids, vocab)
        x = x.at[r, c].add(t.bias_values.astype(jnp.float32), mode="drop")
    if flags.do_blocked and t.blocked_ids.shape[1] > 0:
        r, c = _scatter_index(t.blocked_ids, vocab)
        x = x.at[r, c].set(_NEG_INF, mode="drop")
    return x


# --------------------------------------------------------------------------------------------------
# stage 2: temperature, top-k, top-p, min-p
# --------------------------------------------------------------------------------------------------


def _top_k_top_p_thresholds(
    x: jax.Array, top_k: jax.Array, top_p: jax.Array, num_candidates: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(top-k threshold, top-p threshold, row max); keep tokens with value >= both thresholds."""
    s, vocab = x.shape
    kc = max(1, min(num_candidates, vocab))
    cand = top_k_values(x, kc)  # f32[S, kc], descending (lax.top_k's values; a C++ kernel on CPU)
    # Keep XLA from folding the slices below into the top-k's sort: that defeats its TopK rewrite
    # and turns this into a full sort of the vocabulary (~50x slower on CPU).
    cand = lax.optimization_barrier(cand)
    row_max = cand[:, 0]
    cand_min = cand[:, kc - 1]

    k = top_k.astype(jnp.int32)
    k_on = (k > 0) & (k < vocab)
    topk_fast = k <= kc
    kth_fast = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, kc - 1)[:, None], axis=1)[:, 0]
    kth = jnp.where(k_on & topk_fast, kth_fast, _NEG_INF)
    topk_fb = k_on & ~topk_fast

    p = top_p.astype(jnp.float32)
    p_on = p < 1.0

    def top_p_from_candidates(kth):
        w = jnp.where(x >= kth[:, None], jnp.exp(x - row_max[:, None]), 0.0)
        z = jnp.sum(w, axis=-1, keepdims=True)
        cp = jnp.where(cand >= kth[:, None], jnp.exp(cand - row_max[:, None]), 0.0) / z
        incl = _prefix_sum(cp)
        excl = incl - cp
        n_keep = jnp.sum(excl < p[:, None], axis=-1)  # >= 1 because excl[0] == 0 < p
        cut = jnp.take_along_axis(cand, jnp.clip(n_keep - 1, 0, kc - 1)[:, None], axis=1)[:, 0]
        # Exact iff the candidates reach the target mass, or no kept token lies outside them.
        exact = (incl[:, -1] >= p) | (kth > cand_min) | (kc == vocab)
        return jnp.where(p_on, cut, _NEG_INF), p_on & ~exact

    cut_fast, topp_fb = top_p_from_candidates(kth)

    redo = topk_fb | topp_fb
    g = min(FALLBACK_ROWS, s)

    def fallback_group(i, carry):
        """Exact thresholds of the i-th group of `g` rows that need them (gathered, so the 2 x 32
        bisection passes read g rows instead of the whole batch); padding slots are dropped."""
        kth_c, cut_c = carry
        rows = lax.dynamic_slice(order, (i * g,), (g,))
        valid = rows < s
        r = jnp.minimum(rows, s - 1)
        xr, tk, pon = x[r], topk_fb[r] & valid, p_on[r] & valid
        kth_r = lax.cond(
            jnp.any(tk),
            lambda: _bisect_threshold(xr, jnp.ones_like(xr), jnp.where(tk, k[r], 1).astype(jnp.float32)),
            lambda: kth_c[r],
        )
        kth_r = jnp.where(tk, kth_r, kth_c[r])
        w = jnp.where(xr >= kth_r[:, None], jnp.exp(xr - row_max[r][:, None]), 0.0)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        cut_r = lax.cond(
            jnp.any(pon),
            lambda: _bisect_threshold(xr, w, jnp.where(pon, p[r], 0.0)),
            lambda: jnp.full((g,), _NEG_INF),
        )
        cut_r = jnp.where(pon, cut_r, _NEG_INF)
        dst = jnp.where(valid, rows, s)  # out of range: dropped
        return kth_c.at[dst].set(kth_r, mode="drop"), cut_c.at[dst].set(cut_r, mode="drop")

    # Rows that need the exact fallback first (then s = none), padded to whole groups.
    order = jnp.nonzero(redo, size=s, fill_value=s)[0].astype(jnp.int32)
    order = jnp.pad(order, (0, -(-s // g) * g - s), constant_values=s)
    n_groups = (jnp.sum(redo, dtype=jnp.int32) + g - 1) // g
    kth, cut = lax.fori_loop(0, n_groups, fallback_group, (kth, cut_fast))
    return kth, cut, row_max


def _filter(
    processed: jax.Array, t: SamplingTensors, flags: SamplerFlags, num_candidates: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature-scaled logits, per-row keep threshold, per-row max); keep ``x >= thr``."""
    greedy = _is_greedy(t)
    temp = jnp.where(greedy, 1.0, t.temperature.astype(jnp.float32))
    x = processed.astype(jnp.float32) / temp[:, None]
    if flags.do_top_k_top_p:
        kth, cut, row_max = _top_k_top_p_thresholds(x, t.top_k, t.top_p, num_candidates)
        thr = jnp.maximum(kth, cut)
    else:
        row_max = jnp.max(x, axis=-1)
        thr = jnp.full(row_max.shape, _NEG_INF)
    if flags.do_min_p:
        # probs < min_p * max_prob  <=>  x < max_x + log(min_p)   (log(0) = -inf: disabled)
        thr = jnp.maximum(thr, row_max + jnp.log(t.min_p.astype(jnp.float32)))
    # Greedy rows keep only their argmax (ties included): the point mass greedy decoding samples.
    thr = jnp.where(greedy, row_max, thr)
    return x, thr, row_max


def filter_logits(
    processed: jax.Array,
    t: SamplingTensors,
    flags: SamplerFlags,
    *,
    num_candidates: int = TOP_CANDIDATES,
) -> jax.Array:
    """Temperature scaling, then top-k, top-p and min-p masking (to -inf), in vLLM's order.

    Returns the (unnormalised) logits random rows sample from. Greedy rows are not divided by their
    temperature; everything but their maximum is masked.
    """
    x, thr, _ = _filter(processed, t, flags, num_candidates)
    return jnp.where(x >= thr[:, None], x, _NEG_INF)


# --------------------------------------------------------------------------------------------------
# logprobs and sampling
# --------------------------------------------------------------------------------------------------


def compute_logprobs(
    logits: jax.Array, token_ids: jax.Array, num_logprobs: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax(logits) at ``token_ids`` and the top-``num_logprobs`` (ids, logprobs), descending.

    ``logits`` f32[T, V], ``token_ids`` i32[T]; also usable for prompt logprobs.
    """
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    tok = jnp.take_along_axis(x, token_ids.astype(jnp.int32)[:, None], axis=1)[:, 0] - lse
    if num_logprobs > 0:
        vals, ids = lax.top_k(x, min(num_logprobs, x.shape[-1]))
        return tok, ids.astype(jnp.int32), vals - lse[:, None]
    n = x.shape[0]
    return tok, jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)


@functools.partial(jax.jit, static_argnames=("flags", "num_candidates"))
def sample(
    logits: jax.Array,
    t: SamplingTensors,
    flags: SamplerFlags,
    num_candidates: int = TOP_CANDIDATES,
) -> SamplerOutput:
    """Sample one token per row. Jitted; ``flags`` (and ``num_candidates``) are static.

    Greedy rows: first argmax of ``process_logits``. Random rows: inverse-CDF draw from
    ``filter_logits`` with a uniform from key ``fold_in(key(seed_r), counter_r)``. Logprobs are
    computed from the raw ``logits``; ``topk_*`` have width ``flags.num_logprobs``.
    """
    # Materialise once: otherwise XLA re-derives the penalties inside every consumer fusion.
    processed = lax.optimization_barrier(process_logits(logits, t, flags))
    if flags.all_greedy:
        tokens = _first_argmax(processed)
    else:
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(row_keys(t.seeds, t.counters))
        # Greedy rows: u = 0 selects the first kept token, i.e. the first argmax.
        u = jnp.where(_is_greedy(t), 0.0, u)
        if cpu_inverse_cdf.is_available():  # a C++ kernel: a few passes per row, in its L2
            greedy = _is_greedy(t)
            if flags.do_top_k_top_p or flags.do_min_p:
                # Thresholds compare exactly only with the x they came from (XLA may turn x / T into
                # x * (1 / T)): hand the kernel that x, with T = 1.
                x, thr, _ = _filter(processed, t, flags, num_candidates)
                tokens = cpu_inverse_cdf.inverse_cdf(x, jnp.ones_like(thr), thr, u)
            else:  # no threshold but greedy rows' maximum (NaN), which the kernel finds itself
                thr = jnp.where(greedy, jnp.nan, _NEG_INF)
                temp = jnp.where(greedy, 1.0, t.temperature.astype(jnp.float32))
                tokens = cpu_inverse_cdf.inverse_cdf(processed, temp, thr, u)
        else:
            x, thr, row_max = _filter(processed, t, flags, num_candidates)
            tokens = _inverse_cdf(x, thr, row_max, u)
    if flags.token_logprobs or flags.num_logprobs:
        tok_lp, topk_ids, topk_lp = compute_logprobs(logits, tokens, flags.num_logprobs)
    else:
        n = logits.shape[0]
        tok_lp = jnp.zeros((n,), jnp.float32)
        topk_ids, topk_lp = jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)
    return SamplerOutput(tokens, tok_lp, topk_ids, topk_lp)
