"""SamplingParams validation and the batched sampler, checked against NumPy references."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedjax.sampling.metadata import (
    SamplingRow,
    bucket_width,
    build_sampling_tensors,
    logprobs_bucket,
)
from pagedjax.sampling.sampler import (
    SamplerFlags,
    filter_logits,
    process_logits,
    sample,
)
from pagedjax.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams

HYP = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_process = jax.jit(process_logits, static_argnames=("flags",))
_filter = jax.jit(filter_logits, static_argnames=("flags", "num_candidates"))


# --------------------------------------------------------------------------------------------------
# NumPy references (straight from the definitions)
# --------------------------------------------------------------------------------------------------


def ref_process(logits, params: SamplingParams, prompt, output, blocked=()):
    x = np.array(logits, np.float32)
    v = x.shape[0]
    counts = np.zeros(v, np.float32)
    for tok in output:
        counts[tok] += 1
    seen = counts > 0
    seen[list(prompt)] = True
    rp = np.float32(params.repetition_penalty)
    x = np.where(seen, np.where(x > 0, x / rp, x * rp), x).astype(np.float32)
    x = x - np.float32(params.frequency_penalty) * counts
    x = x - np.float32(params.presence_penalty) * (counts > 0).astype(np.float32)
    for tok, b in (params.logit_bias or {}).items():
        if tok < v:
            x[tok] += np.float32(b)
    for tok in blocked:
        if 0 <= tok < v:
            x[tok] = -np.inf
    return x.astype(np.float32)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_filter(processed, params: SamplingParams):
    """(scaled logits, allowed mask, margin): margin is how far the top-p/min-p decisions are from
    their boundaries (tiny margins are numerically ambiguous and skipped by the tests)."""
    x = np.asarray(processed, np.float32)
    if params.greedy:
        return x, x == x.max(), np.inf
    xs = (x / np.float32(params.temperature)).astype(np.float32)
    z = xs.astype(np.float64)
    allowed = np.ones(z.shape, bool)
    margin = np.inf
    if 0 < params.top_k < z.size:
        kth = np.sort(z)[::-1][params.top_k - 1]  # ties with the k-th value are kept
        allowed &= z >= kth
    if params.top_p < 1.0:
        masked = np.where(allowed, z, -np.inf)
        probs = _softmax(masked)
        order = np.argsort(-masked, kind="stable")
        sp = probs[order]
        excl = np.cumsum(sp) - sp  # mass of strictly better-ranked tokens
        n_keep = int(np.sum(excl < params.top_p))
        allowed &= z >= masked[order[n_keep - 1]]
        margin = min(margin, float(np.min(np.abs(excl - params.top_p))))
    if params.min_p > 0:
        probs = _softmax(np.where(allowed, z, -np.inf))
        allowed &= probs >= params.min_p * probs.max()
        ratio = probs[(probs > 0) & (probs < probs.max())] / probs.max()  # the max is always kept
        if ratio.size:
            margin = min(margin, float(np.min(np.abs(ratio - params.min_p))))
    return xs, allowed & np.isfinite(z), margin


def ref_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def rows_for(params_list, prompts=None, outputs=None, blocked=None, seeds=None):
    n = len(params_list)
    prompts = prompts or [()] * n
    outputs = outputs or [()] * n
    blocked = blocked or [()] * n
    seeds = seeds or list(range(n))
    return [
        SamplingRow(p, pr, o, s, b)
        for p, pr, o, s, b in zip(params_list, prompts, outputs, seeds, blocked, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# SamplingParams
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ],
)
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.max_tokens, p.min_tokens) == (None, [], [], 16, 0)
    assert (p.ignore_eos, p.logprobs, p.prompt_logprobs, p.logit_bias) == (False, None, None, None)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy and not p.has_penalties

    q = SamplingParams(top_k=-1, stop="###", stop_token_ids=(5, 6), logit_bias={"3": 2}, max_tokens=None)
    assert q.top_k == 0 and q.stop == ["###"] and q.stop_token_ids == [5, 6] and q.logit_bias == {3: 2.0}
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    g = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)  # vLLM: filters off for greedy

    stops = ["a"]
    r = SamplingParams(stop=stops, seed=3)
    c = r.clone(temperature=0.5)
    assert c.temperature == 0.5 and c.seed == 3 and c.stop == ["a"] and r.temperature == 1.0
    c.stop.append("b")
    assert r.stop == ["a"] and stops == ["a"]
    with pytest.raises(ValueError, match="top_p"):
        r.clone(top_p=2.0)


def test_beam_search_params():
    b = BeamSearchParams(beam_width=4, max_tokens=32)
    assert (b.length_penalty, b.ignore_eos) == (1.0, False)
    for kwargs, field in [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": "x"}, "length_penalty"),
    ]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)


# --------------------------------------------------------------------------------------------------
# metadata builder
# --------------------------------------------------------------------------------------------------


def test_bucketing_helpers():
    assert [bucket_width(n) for n in (0, 1, 16, 17, 100)] == [0, 16, 16, 32, 128]
    assert [logprobs_bucket(n) for n in (0, 1, 3, 5, 16, 17, 20)] == [0, 1, 4, 8, 16, 20, 20]


def test_build_sampling_tensors_shapes_and_flags():
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), [1, 2, 3], [4], 11),
        SamplingRow(SamplingParams(top_k=5, logprobs=3), [1] * 40, [2] * 3, 12, [7, 8]),
    ]
    t, f = build_sampling_tensors(rows, 8)
    assert f == SamplerFlags(
        do_penalties=False,
        do_top_k_top_p=True,
        do_min_p=False,
        do_blocked=True,
        do_bias=False,
        num_logprobs=4,
        all_greedy=False,
        token_logprobs=True,
    )
    _, f2 = build_sampling_tensors([SamplingRow(SamplingParams(temperature=0.0))], 4)
    assert not f2.token_logprobs, "nobody reads logprobs: the log-softmax is compiled out"
    for sp in (SamplingParams(temperature=0.0, logprobs=0), SamplingParams(n=1, best_of=3)):
        assert build_sampling_tensors([SamplingRow(sp)], 4)[1].token_logprobs, sp
    assert t.prompt_ids.shape == (8, 0) and t.output_ids.shape == (8, 0)  # penalties off: not shipped
    assert t.blocked_ids.shape == (8, 16) and t.bias_ids.shape == (8, 0)
    assert list(t.blocked_ids[1, :3]) == [7, 8, -1] and (t.blocked_ids[2:] == -1).all()
    assert list(t.counters[:2]) == [1, 3] and list(t.seeds[:2]) == [11, 12]
    assert (t.temperature[2:] == 0).all() and (t.top_k[2:] == 0).all()  # padded rows: greedy
    assert t.top_k[1] == 5 and t.top_k.dtype == np.int32 and t.seeds.dtype == np.uint32

    rows = [
        SamplingRow(SamplingParams(presence_penalty=0.5), list(range(40)), list(range(20)), 1),
        SamplingRow(SamplingParams(logit_bias={3: 1.0, 9: -2.0}), [1], [2], 2),
    ]
    t, f = build_sampling_tensors(rows, 4)
    assert f.do_penalties and f.do_bias and not f.do_blocked and f.all_greedy is False
    assert t.prompt_ids.shape == (4, 0)  # only the repetition penalty reads the prompt
    assert t.output_ids.shape == (4, 32) and (t.output_ids[1] == -1).all()
    assert list(t.bias_ids[1, :3]) == [3, 9, -1] and list(t.bias_values[1, :2]) == [1.0, -2.0]

    t, f = build_sampling_tensors([SamplingRow(SamplingParams(repetition_penalty=1.3), [5] * 3, [])], 2)
    assert t.prompt_ids.shape == (2, 16) and t.output_ids.shape == (2, 0) and f.do_penalties
    t, f = build_sampling_tensors(
        [SamplingRow(SamplingParams(temperature=0, seed=1), [1], [2], 2**40 + 5)], 1
    )
    assert f.all_greedy and t.seeds[0] == 5
    with pytest.raises(ValueError):
        build_sampling_tensors(rows, 1)


# --------------------------------------------------------------------------------------------------
# process_logits: penalties, logit bias, blocked ids
# --------------------------------------------------------------------------------------------------

V = 64

penalty_params = st.builds(
    SamplingParams,
    repetition_penalty=st.sampled_from([1.0, 0.5, 1.3, 2.0]),
    presence_penalty=st.sampled_from([0.0, -1.0, 0.7, 2.0]),
    frequency_penalty=st.sampled_from([0.0, -0.5, 0.4, 2.0]),
    logit_bias=st.one_of(
        st.none(), st.dictionaries(st.integers(0, V + 5), st.floats(-100, 100, width=32), max_size=5)
    ),
    min_tokens=st.integers(0, 3),
    max_tokens=st.just(16),
)


@HYP
@given(
    params=st.lists(penalty_params, min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_process_logits_matches_reference(params, seed):
    rng = np.random.default_rng(seed)
    s = 4
    logits = (rng.normal(size=(s, V)) * 3).astype(np.float32)
    prompts = [list(rng.integers(0, V, rng.integers(0, 20))) for _ in params]
    outputs = [list(rng.integers(0, V, rng.integers(0, 20))) for _ in params]
    # min_tokens: the engine blocks EOS (+ stop ids) while fewer than min_tokens were generated.
    blocked = [[0, 3] if len(o) < p.min_tokens else [] for p, o in zip(params, outputs, strict=True)]
    t, f = build_sampling_tensors(rows_for(params, prompts, outputs, blocked), s)
    got = np.asarray(_process(jnp.asarray(logits), t, f))
    for i, p in enumerate(params):
        want = ref_process(logits[i], p, prompts[i], outputs[i], blocked[i])
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[len(params) :], logits[len(params) :])  # padded rows untouched


def test_repetition_penalty_explicit():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0, 0.0]], np.float32)
    p = SamplingParams(repetition_penalty=2.0)
    t, f = build_sampling_tensors([SamplingRow(p, [0, 1], [5], 0)], 1)
    got = np.asarray(_process(jnp.asarray(logits), t, f))[0]
    np.testing.assert_allclose(got, [1.0, -4.0, 2.0, -2.0, 1.0, 0.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    t, f = build_sampling_tensors([SamplingRow(p, [0, 1], [2, 2, 2, 4], 0)], 1)
    got = np.asarray(_process(jnp.asarray(logits), t, f))[0]
    np.testing.assert_allclose(got, [2.0, -2.0, 2.0 - 0.5 - 0.75, -2.0, 1.0 - 0.5 - 0.25, 0.0])


# --------------------------------------------------------------------------------------------------
# filter_logits: temperature, top-k, top-p, min-p
# --------------------------------------------------------------------------------------------------

filter_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 10, 63, 64, 100]),
    top_p=st.sampled_from([1.0, 0.05, 0.5, 0.9, 0.99]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
)


def _check_filter(logits, params, got, allow_ambiguous=1e-5):
    for i, p in enumerate(params):
        xs, allowed, margin = ref_filter(logits[i], p)
        if margin < allow_ambiguous:
            continue
        got_allowed = np.isfinite(got[i])
        np.testing.assert_array_equal(got_allowed, allowed, err_msg=f"row {i}: {p}")
        assert got_allowed.any()
        np.testing.assert_allclose(got[i][allowed], xs[allowed], rtol=1e-6)


@HYP
@given(
    params=st.lists(filter_params, min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
    scale=st.sampled_from([0.1, 2.0, 8.0]),
)
def test_filter_logits_matches_reference(params, seed, ties, scale):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(4, V)) * scale).astype(np.float32)
    if ties:
        logits = np.round(logits).astype(np.float32)  # many exact ties
    t, f = build_sampling_tensors(rows_for(params), 4)
    got = np.asarray(_filter(jnp.asarray(logits), t, f))
    _check_filter(logits, params, got)


@pytest.mark.parametrize("flat", [False, True])
def test_filter_logits_candidate_fallback(flat):
    """top-k beyond the candidate count and nuclei not inside the candidates use the exact fallback."""
    rng = np.random.default_rng(int(flat))
    vocab = 1000
    logits = (rng.normal(size=(6, vocab)) * (0.05 if flat else 2.0)).astype(np.float32)
    logits[3] = np.round(logits[3] * 4)  # ties
    params = [
        SamplingParams(top_k=100),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=300, top_p=0.9, temperature=0.7),
        SamplingParams(top_k=40, top_p=0.95),
        SamplingParams(top_k=5, top_p=0.6, min_p=0.01),
        SamplingParams(temperature=0.0),
    ]
    t, f = build_sampling_tensors(rows_for(params), 6)
    for nc in (16, 256):  # 16: fallback path for most rows; 256: fast path for some
        got = np.asarray(_filter(jnp.asarray(logits), t, f, num_candidates=nc))
        _check_filter(logits, params, got)


def test_filter_logits_fallback_in_groups():
    """More rows need the exact fallback than one group holds (FALLBACK_ROWS): every group's rows get
    exact thresholds, rows on the fast path and padding rows are left alone."""
    from pagedjax.sampling.sampler import FALLBACK_ROWS

    rng = np.random.default_rng(7)
    vocab, n = 600, 2 * FALLBACK_ROWS + 5
    scales = rng.choice([0.05, 0.5, 4.0], size=(n + 3, 1))  # flat rows need the fallback for top-p
    logits = (rng.normal(size=(n + 3, vocab)) * scales).astype(np.float32)
    logits[2] = np.round(logits[2] * 4)  # ties
    kinds = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=200, temperature=0.8),
        SamplingParams(top_k=30, top_p=0.95),
        SamplingParams(top_p=0.5, min_p=0.02),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3),
    ]
    params = [kinds[i % len(kinds)] for i in range(n)]
    t, f = build_sampling_tensors(rows_for(params), n + 3)  # 3 padding rows
    got = np.asarray(_filter(jnp.asarray(logits), t, f, num_candidates=16))
    _check_filter(logits[:n], params, got[:n])


def test_temperature_scaling_and_greedy_rows():
    logits = np.array([[1.0, 3.0, 3.0, -2.0]] * 3, np.float32)
    params = [SamplingParams(temperature=0.5), SamplingParams(temperature=0.0), SamplingParams(top_k=1)]
    t, f = build_sampling_tensors(rows_for(params), 3)
    got = np.asarray(_filter(jnp.asarray(logits), t, f))
    np.testing.assert_allclose(got[0], [2.0, 6.0, 6.0, -4.0])
    assert np.isfinite(got[1]).tolist() == [False, True, True, False]  # argmax ties, no division
    assert np.isfinite(got[2]).tolist() == [False, True, True, False]  # top-k keeps ties (vLLM)


# --------------------------------------------------------------------------------------------------
# sample: greedy, seeded reproducibility, frequencies, logprobs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 255, 256, 257, 1000])
def test_first_argmax_matches_numpy_first_index(vocab):
    """The two-stage argmax equals numpy's first-index argmax, ties across and inside chunks,
    -inf rows and an all-NaN row (-> last index) included."""
    from pagedjax.sampling.sampler import _first_argmax

    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 4, size=(9, vocab)).astype(np.float32)  # many ties
    x[1] = -np.inf
    x[2, -1] = 100.0
    x[3, :] = 5.0
    x[4] = np.nan
    if vocab > 3:
        x[5, [vocab // 2, vocab - 1]] = 50.0
    got = np.asarray(_first_argmax(jnp.asarray(x), chunk=64))
    want = np.argmax(x, axis=1)
    want[4] = vocab - 1  # all NaN
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(_first_argmax(jnp.asarray(x))), want)


def test_greedy_is_first_argmax_of_processed_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, V)).astype(np.float32)
    logits[1, [7, 9]] = 10.0  # tie -> first index
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=3.0, logit_bias={5: 4.0}),
        SamplingParams(temperature=0.0, min_tokens=2),
        SamplingParams(temperature=0.9, top_k=3),  # a random row: exercises the mixed path
    ]
    prompts = [(), (), (int(np.argmax(logits[2])),), (), ()]
    blocked = [(), (), (), (int(np.argmax(logits[3])),), ()]
    rows = rows_for(params, prompts=prompts, blocked=blocked)
    for batch in (rows[:4], rows):  # all-greedy fast path, then the mixed path
        t, f = build_sampling_tensors(batch, 8)
        assert f.all_greedy == (len(batch) == 4)
        out = sample(jnp.asarray(np.pad(logits[: len(batch)], ((0, 8 - len(batch)), (0, 0)))), t, f)
        toks = np.asarray(out.tokens)
        for i in range(4):
            want = int(np.argmax(ref_process(logits[i], params[i], prompts[i], (), blocked[i])))
            assert toks[i] == want
        assert toks[1] == 7


def _sample_rows(logits_rows, rows, num_padded=None):
    n = len(rows)
    s = num_padded or n
    t, f = build_sampling_tensors(rows, s)
    x = np.zeros((s, logits_rows.shape[1]), np.float32)
    x[:n] = logits_rows
    return np.asarray(sample(jnp.asarray(x), t, f).tokens)[:n]


def test_seeded_sampling_reproducible_and_independent_of_batch_mates():
    rng = np.random.default_rng(1)
    vocab = 300
    base = (rng.normal(size=vocab) * 1.5).astype(np.float32)
    me = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    others = [
        SamplingParams(temperature=0.8),
        SamplingParams(top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.1, repetition_penalty=1.2),
        SamplingParams(temperature=1.5, top_p=0.5),
        SamplingParams(),
        SamplingParams(presence_penalty=1.0, logprobs=5),
    ]
    for counter in range(6):
        row = SamplingRow(me, [1, 2], list(range(counter)), 1234)
        alone = _sample_rows(base[None], [row])[0]
        assert alone == _sample_rows(base[None], [row], num_padded=8)[0]
        for pos in (0, 3, 7):
            mates = [SamplingRow(p, [3], [4] * 3, 100 + j) for j, p in enumerate(others)]
            batch = mates[:pos] + [row] + mates[pos:]
            x = (rng.normal(size=(8, vocab)) * 3).astype(np.float32)
            x[pos] = base
            assert _sample_rows(x, batch)[pos] == alone, (counter, pos)
    # the counter advances the stream: different steps give (mostly) different tokens
    flat = np.zeros((1, vocab), np.float32)
    toks = {int(_sample_rows(flat, [SamplingRow(me, [], [], 7, (), c)])[0]) for c in range(8)}
    assert len(toks) > 4


def _chi_square(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum()), int(keep.sum()) - 1


FREQ_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.6, top_k=6),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
]


def test_sampling_frequencies_match_reference():
    rng = np.random.default_rng(42)
    vocab = 600  # > one inverse-CDF block (256)
    logits = np.full(vocab, -np.inf, np.float32)
    support = np.array([0, 5, 255, 256, 257, 300, 511, 512, 598, 599])
    logits[support] = rng.normal(size=support.size).astype(np.float32)
    prompt = [5, 300]
    n = 3000
    # One row per draw (one batch, one compile): same seed, counters 0..n-1 -> independent draws,
    # fully deterministic, so the bound below cannot flake.
    rows = [SamplingRow(p, prompt, [], 99, (), c) for p in FREQ_PARAMS for c in range(n)]
    toks = _sample_rows(np.broadcast_to(logits, (len(rows), vocab)), rows).reshape(len(FREQ_PARAMS), n)
    for params, got in zip(FREQ_PARAMS, toks, strict=True):
        xs, allowed, _ = ref_filter(ref_process(logits, params, prompt, []), params)
        probs = _softmax(np.where(allowed, xs, -np.inf))
        counts = np.bincount(got, minlength=vocab).astype(np.float64)
        assert counts[~allowed].sum() == 0  # never a filtered-out token
        stat, dof = _chi_square(counts, probs)
        # The 99.99th percentile of chi2(dof) is < 4 * dof + 20 for dof <= 9.
        assert stat < 4 * dof + 20, (params, stat, dof, counts[support], probs[support] * n)


def test_blocked_tokens_never_sampled():
    vocab = 50
    logits = np.zeros((256, vocab), np.float32)
    logits[:, 0] = 5.0  # EOS would be very likely
    p = SamplingParams(min_tokens=4, temperature=2.0, logprobs=0)
    rows = [SamplingRow(p, [], [], i, (0, 1)) for i in range(256)]
    t, f = build_sampling_tensors(rows, 256)
    out = sample(jnp.asarray(logits), t, f)
    toks = np.asarray(out.tokens)
    assert not np.isin(toks, [0, 1]).any() and len(set(toks.tolist())) > 20
    # logprobs=0: zero-width top-N, but the sampled token's logprob is returned
    assert out.topk_ids.shape == (256, 0) and out.topk_logprobs.shape == (256, 0)
    np.testing.assert_allclose(
        np.asarray(out.token_logprobs), ref_log_softmax(logits)[np.arange(256), toks], rtol=1e-5, atol=1e-5
    )


def test_logprobs_from_raw_logits_and_top_n_order():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(4, V)) * 2).astype(np.float32)
    logits[2, [10, 11]] = 9.0
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
        SamplingParams(logprobs=5, top_k=4, temperature=0.5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(top_p=0.7, logprobs=2),
    ]
    t, f = build_sampling_tensors(rows_for(params, prompts=[[1, 2, 3]] * 4), 4)
    assert f.num_logprobs == 8
    out = sample(jnp.asarray(logits), t, f)
    ref = ref_log_softmax(logits)
    toks = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.token_logprobs), ref[np.arange(4), toks], rtol=1e-5, atol=1e-5)
    ids, lps = np.asarray(out.topk_ids), np.asarray(out.topk_logprobs)
    assert ids.shape == lps.shape == (4, 8)
    for i in range(4):
        order = np.argsort(-ref[i], kind="stable")[:8]
        np.testing.assert_allclose(lps[i], ref[i][order], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ids[i], order)  # descending, ties by lower id
        assert np.all(np.diff(lps[i]) <= 0)
    assert list(ids[2, :2]) == [10, 11]


def test_bf16_logits_and_flags_are_hashable():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, V)), jnp.bfloat16)
    t, f = build_sampling_tensors(rows_for([SamplingParams(temperature=0.0)] * 2), 2)
    out = sample(logits, t, f)
    want = np.argmax(np.asarray(logits.astype(jnp.float32)), -1)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert hash(f) == hash(dataclasses.replace(f))
    assert out.tokens.dtype == jnp.int32 and out.token_logprobs.dtype == jnp.float32


def test_token_logprobs_compiled_out_when_nobody_reads_them():
    """Same tokens with the log-softmax compiled out; its outputs are then zeros."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray((rng.normal(size=(6, V)) * 3).astype(np.float32))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, seed=3)] * 3
    t, f = build_sampling_tensors(rows_for(params, prompts=[[1, 2]] * 6), 6)
    assert not f.token_logprobs
    off = sample(logits, t, f)
    on = sample(logits, t, dataclasses.replace(f, token_logprobs=True))
    np.testing.assert_array_equal(np.asarray(off.tokens), np.asarray(on.tokens))
    assert not np.asarray(off.token_logprobs).any()
    np.testing.assert_allclose(
        np.asarray(on.token_logprobs),
        ref_log_softmax(np.asarray(logits))[np.arange(6), np.asarray(on.tokens)],
        rtol=1e-5,
        atol=1e-5,
    )
