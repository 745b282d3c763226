"""Issue 5: page sharing on the ref-counted pool — automatic prefix caching, parallel samples that
share the prompt's pages, and beam search (forks + copy-on-write) equal to HF transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedjax import LLM, SamplingParams
from pagedjax.engine.llm_engine import InvalidRequestError
from pagedjax.sampling_params import BeamSearchParams

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _llm(path, **kw) -> LLM:
    args = dict(
        dtype="float32",
        block_size=BLOCK,
        num_kv_pages=512,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        max_num_prefill_seqs=16,
        max_model_len=1100,
        warmup=False,
        compilation_cache_dir="off",
    )
    return LLM(path, **{**args, **kw})


LONG = dict(max_position_embeddings=1104)  # room for the 1,000-token prompt


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama", **LONG)


@pytest.fixture(scope="module")
def llm(path):
    return _llm(path)


# ------------------------------------------------------------------------------------------------
# Automatic prefix caching
# ------------------------------------------------------------------------------------------------
BASE = np.random.default_rng(5).integers(3, 500, size=40).tolist()
# How many leading tokens each prompt shares with BASE: at page boundaries (16, 20, 40), off them
# (1, 3, 17, 23, 39), and BASE itself.
SHARED = [1, 3, 16, 17, 20, 23, 39, 40]


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(6)
    out = []
    for n in SHARED:
        suffix = rng.integers(3, 500, size=int(rng.integers(2, 12))).tolist()
        if n < len(BASE):
            suffix[0] = BASE[n] + 1  # diverge right after the shared part
        out.append(BASE[:n] + suffix)
    out.append(list(BASE))
    return out


def _expected_hit_tokens(prompt: list[int]) -> int:
    """Full pages of the prefix shared with BASE (BASE's generated tokens are cached too), leaving
    the prompt's last token to compute."""
    common = 0
    while common < min(len(prompt), len(BASE)) and prompt[common] == BASE[common]:
        common += 1
    return min(common // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK


def _run_with_shared_prefixes(llm: LLM) -> tuple[list[list[int]], list[int], dict]:
    llm.reset_prefix_cache()
    base = llm.generate([{"prompt_token_ids": BASE}], GREEDY, use_tqdm=False)[0]
    before = llm.get_metrics()
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], GREEDY, use_tqdm=False)
    after = llm.get_metrics()
    stats = {k: after[k] - before[k] for k in ("prefix_cache_queries", "prefix_cache_hits")}
    return (
        [base.outputs[0].token_ids] + [o.outputs[0].token_ids for o in outs],
        [o.num_cached_tokens for o in outs],
        stats,
    )


def test_prefix_caching_same_greedy_outputs_and_expected_hits(llm, path):
    with_cache, cached_tokens, stats = _run_with_shared_prefixes(llm)
    without_cache, no_hits, no_stats = _run_with_shared_prefixes(_llm(path, enable_prefix_caching=False))
    assert with_cache == without_cache
    expected = [_expected_hit_tokens(p) for p in _prompts()]
    assert cached_tokens == expected, "per-request cached prompt tokens"
    assert stats["prefix_cache_hits"] == sum(expected)
    assert stats["prefix_cache_queries"] == sum(len(p) for p in _prompts())
    assert sum(expected) > 0 and no_hits == [0] * len(expected) and no_stats["prefix_cache_hits"] == 0


def test_cached_pages_stay_until_evicted_and_reset_drops_them(llm):
    llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": BASE}], GREEDY, use_tqdm=False)
    m = llm.get_metrics()
    assert m["kv_pages_used"] == 0, "finished requests hold no pages"
    # BASE (40 tokens) + 6 generated: the 11 pages that were full when computed stay cached.
    assert m["kv_pages_cached"] == (len(BASE) + 5) // BLOCK
    out = llm.generate([{"prompt_token_ids": BASE + [7]}], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == len(BASE)
    assert llm.reset_prefix_cache() > 0
    assert llm.get_metrics()["kv_pages_cached"] == 0
    out = llm.generate([{"prompt_token_ids": BASE + [7]}], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0


def test_cache_salt_separates_prefixes(llm):
    llm.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": BASE, "cache_salt": "alice"}], GREEDY, use_tqdm=False)
    other = llm.generate([{"prompt_token_ids": BASE, "cache_salt": "bob"}], GREEDY, use_tqdm=False)[0]
    same = llm.generate([{"prompt_token_ids": BASE, "cache_salt": "alice"}], GREEDY, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == (len(BASE) - 1) // BLOCK * BLOCK
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        llm.generate([{"prompt_token_ids": BASE, "cache_salt": 3}], GREEDY, use_tqdm=False)


def test_eviction_under_pressure_keeps_outputs_right(path):
    """A pool too small to keep everything cached: pages are evicted LRU and reused; outputs equal
    those of an engine without caching."""
    small = _llm(path, num_kv_pages=40, max_num_seqs=4, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": p} for p in _prompts()] * 2
    ours = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, use_tqdm=False)]
    ref = _llm(path, enable_prefix_caching=False, num_kv_pages=40, max_num_seqs=4, max_num_batched_tokens=32)
    assert ours == [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY, use_tqdm=False)]
    m = small.get_metrics()
    assert m["prefix_cache_evictions"] > 0 and m["prefix_cache_hits"] > 0 and m["kv_pages_used"] == 0
    small.llm_engine.kv_cache.check_invariants()


# ------------------------------------------------------------------------------------------------
# Parallel sampling shares the prompt's pages
# ------------------------------------------------------------------------------------------------
def _pages_after_prompt(llm: LLM, prompt: list[int], n: int) -> tuple[int, int, list]:
    """Pool pages in use right after the step that completes the prompt, and one step later."""
    engine = llm.llm_engine
    llm.reset_prefix_cache()
    params = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    rid = engine.add_request(None, {"prompt_token_ids": prompt}, params)
    while not any(o.request_id == rid for o in engine.step()):
        pass
    after_prompt = engine.kv_cache.pool.num_used
    engine.step()
    after_first_write = engine.kv_cache.pool.num_used
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    engine.kv_cache.check_invariants()
    return after_prompt, after_first_write, outs[0].outputs


def test_n4_holds_one_copy_of_a_1000_token_prompt(llm):
    prompt = np.random.default_rng(9).integers(3, 500, size=1001).tolist()  # 250 full pages + 1 token
    p1, w1, _ = _pages_after_prompt(llm, prompt, 1)
    p4, w4, outs = _pages_after_prompt(llm, prompt, 4)
    assert p1 == -(-len(prompt) // BLOCK)
    assert p4 == p1, "n=4 must share the prompt's pages"
    # Writing the first sampled token copies the shared partial page for 3 of the 4 samples only.
    assert w4 == w1 + 3
    assert len({tuple(o.token_ids) for o in outs}) > 1, "the 4 samples should differ"


def test_forked_samples_equal_independent_requests(llm):
    """Sample i of n=3 (seed s) == a single request with sample i's seed: forking changes nothing."""
    from pagedjax.engine.llm_engine import _child_seed

    prompt = {"prompt_token_ids": BASE[:13]}
    sp = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=5)
    outs = llm.generate([prompt], sp, use_tqdm=False)[0].outputs
    for i, o in enumerate(outs):
        single = SamplingParams(temperature=0.8, seed=_child_seed(11, i), max_tokens=5)
        assert llm.generate([prompt], single, use_tqdm=False)[0].outputs[0].token_ids == o.token_ids


# ------------------------------------------------------------------------------------------------
# Beam search == HF transformers
# ------------------------------------------------------------------------------------------------
def _hf_beams(hf, prompt, k, max_tokens, length_penalty, eos):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            num_beams=k,
            num_return_sequences=k,
            do_sample=False,
            length_penalty=length_penalty,
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return [s[len(prompt) :].tolist() for s in out]


def _until_eos(hf_seq: list[int], eos: tuple[int, ...]) -> list[int]:
    """HF pads finished hypotheses (with an EOS id): cut after the first EOS."""
    for i, t in enumerate(hf_seq):
        if t in eos:
            return hf_seq[: i + 1]
    return hf_seq


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_equals_hf(llm, path, hf_model, k, length_penalty):
    hf = hf_model(path)
    rng = np.random.default_rng(k)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in (3, 9, 14)]
    params = BeamSearchParams(beam_width=k, max_tokens=10, length_penalty=length_penalty, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs, strict=True):
        ours = [c.token_ids for c in o.outputs]
        assert ours == _hf_beams(hf, p, k, 10, length_penalty, eos=None)
    assert llm.get_metrics()["kv_pages_used"] == 0


def test_beam_search_with_eos_equals_hf(model_dir, hf_model):
    """An EOS the random model actually emits inside beams: finished hypotheses of different lengths."""
    plain = model_dir("llama", **LONG)
    prompt = np.random.default_rng(2).integers(3, 500, size=7).tolist()
    probe = _hf_beams(hf_model(plain), prompt, 4, 8, 1.0, eos=None)
    eos = probe[1][3]  # a token some beam picks mid-way
    path = model_dir("llama", eos_token_id=int(eos), **LONG)
    llm = _llm(path)
    assert eos in llm.llm_engine.eos_token_ids
    hf = hf_model(path)
    for k in (2, 4):
        params = BeamSearchParams(beam_width=k, max_tokens=8)
        ours = [c.token_ids for c in llm.beam_search([{"prompt_token_ids": prompt}], params)[0].outputs]
        ref = _hf_beams(hf, prompt, k, 8, 1.0, eos=list(llm.llm_engine.eos_token_ids))
        assert ours == [_until_eos(r, llm.llm_engine.eos_token_ids) for r in ref]
        assert any(o[-1] in llm.llm_engine.eos_token_ids for o in ours), "no hypothesis ended with EOS"


def test_beam_search_rejects_bad_params(llm):
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        llm.beam_search([BASE], BeamSearchParams(beam_width=32, max_tokens=4))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.beam_search([BASE], BeamSearchParams(beam_width=2, max_tokens=5000))


def test_prompt_logprobs_requests_skip_the_prefix_cache(llm):
    """vLLM's rule: positions adopted from the cache are never computed, so a request that wants
    prompt logprobs computes its whole prompt (and gets a logprob for every prompt token)."""
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    first, again = (llm.generate([{"prompt_token_ids": BASE}], sp, use_tqdm=False)[0] for _ in range(2))
    assert again.num_cached_tokens == 0
    assert len(again.prompt_logprobs) == len(BASE) and all(d is not None for d in again.prompt_logprobs[1:])
    assert again.prompt_logprobs == first.prompt_logprobs
