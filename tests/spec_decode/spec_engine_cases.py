"""Speculative decoding through the real engine, for each method (n-gram lookup, layer-skip
self-speculation): exactly the tokens of the engine without speculation, greedy and seeded
sampling, with a pool so small that requests are preempted, prefix caching, n = 2, varied
max_tokens (landing inside accepted runs), stop strings and aborts."""

from __future__ import annotations

import numpy as np
import pytest

from pagedjax import LLM, SamplingParams

METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "layer_skip": {"method": "layer_skip", "num_draft_layers": 1, "num_speculative_tokens": 3},
    # The target drafting for itself through the draft-model machinery (its own pool, mirrored
    # steps): nearly every draft is accepted, so long accepted runs are exercised too.
    "draft_model": {"method": "draft_model", "model": "<target>", "num_speculative_tokens": 3},
}
COMMON = dict(
    dtype="float32",
    block_size=4,
    num_kv_pages=40,  # 160 slots for up to 8 sequences of up to ~70 tokens: preemption is certain
    max_num_seqs=8,
    max_num_batched_tokens=32,
    max_num_prefill_seqs=6,
    max_model_len=128,
    warmup=False,
    compilation_cache_dir="off",
    seed=0,
)


def repetitive_prompts(n: int = 32, seed: int = 7) -> list[list[int]]:
    """Prompts that repeat a random segment (what prompt lookup can draft from), some sharing a
    common prefix (prefix cache hits)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 300, size=8).tolist()
    out = []
    for i in range(n):
        seg = rng.integers(3, 300, size=int(rng.integers(3, 9))).tolist()
        body = seg * int(rng.integers(2, 5)) + rng.integers(3, 300, size=int(rng.integers(0, 6))).tolist()
        out.append((shared + body) if i % 3 == 0 else body)
    return out


PROMPTS = repetitive_prompts()
MAX_TOKENS = [int(m) for m in np.random.default_rng(3).integers(1, 30, size=len(PROMPTS))]


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def plain(path):
    llm = LLM(path, **COMMON)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module", params=list(METHODS))
def spec(path, request):
    config = dict(METHODS[request.param])
    if config.get("model") == "<target>":
        config["model"] = path
    llm = LLM(path, speculative_config=config, **COMMON)
    yield llm
    llm.shutdown()


def run(llm, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def greedy_params():
    return [
        SamplingParams(n=2 if i % 4 == 0 else 1, temperature=0.0, max_tokens=m, ignore_eos=True)
        for i, m in enumerate(MAX_TOKENS)
    ]


def test_greedy_identical_with_and_without_speculation(plain, spec):
    before = spec.get_metrics()
    assert run(spec, greedy_params()) == run(plain, greedy_params())
    m = spec.get_metrics()
    assert m["spec_num_draft_tokens"] > before.get("spec_num_draft_tokens", 0)
    assert m["spec_num_accepted_tokens"] > before.get("spec_num_accepted_tokens", 0)
    assert m["num_preemptions"] > 0
    assert m["prefix_cache_hits"] > 0
    assert m["kv_pages_used"] == 0


def test_seeded_sampling_identical_with_and_without_speculation(plain, spec):
    """Position j of a verified chunk draws with the counter a plain step would use there, through
    the full pipeline (penalties see the drafts as outputs): seeded outputs match token for token."""
    params = [
        SamplingParams(
            n=2,
            temperature=0.8 if i % 2 else 0.05,  # low: drafts get accepted (the model is random)
            top_k=40 if i % 2 else 0,
            top_p=0.9,
            min_p=0.02 if i % 3 == 0 else 0.0,
            repetition_penalty=1.1 if i % 4 == 0 else 1.0,
            presence_penalty=0.3 if i % 5 == 0 else 0.0,
            frequency_penalty=0.2 if i % 6 == 0 else 0.0,
            logit_bias={5: 2.0} if i % 7 == 0 else None,
            min_tokens=min(3, m),
            max_tokens=m,
            seed=100 + i,
        )
        for i, m in enumerate(MAX_TOKENS)
    ]
    before = spec.get_metrics()["spec_num_accepted_tokens"]
    assert run(spec, params) == run(plain, params)
    assert spec.get_metrics()["spec_num_accepted_tokens"] > before


def test_logprobs_are_the_targets(plain, spec):
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, logprobs=2, ignore_eos=True) for m in MAX_TOKENS[:8]
    ]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:8]]
    a = spec.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b, strict=True):
        lx, ly = x.outputs[0].logprobs, y.outputs[0].logprobs
        assert len(lx) == len(ly) == len(x.outputs[0].token_ids)
        for dx, dy in zip(lx, ly, strict=True):
            assert dx.keys() == dy.keys()
            for t in dx:
                assert abs(dx[t] - dy[t]) < 1e-4


def test_stop_strings_inside_an_accepted_run(plain, spec):
    """Cut a greedy output's text in its middle and stop there: both engines end on the same
    token, and the speculating one keeps no accepted token past the stop string."""
    full = plain.generate(
        [{"prompt_token_ids": PROMPTS[1]}],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("no printable text to stop on")
    p = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    a = spec.generate([{"prompt_token_ids": PROMPTS[1]}], p, use_tqdm=False)[0].outputs[0]
    b = plain.generate([{"prompt_token_ids": PROMPTS[1]}], p, use_tqdm=False)[0].outputs[0]
    assert (a.text, list(a.token_ids), a.finish_reason) == (b.text, list(b.token_ids), b.finish_reason)
    assert b.finish_reason == "stop"


def test_abort_while_speculating_frees_every_page(spec):
    engine = spec.llm_engine
    for i, p in enumerate(PROMPTS[:6]):
        engine.add_request(
            f"abort-{i}",
            {"prompt_token_ids": p},
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        )
    for _ in range(6):
        engine.step()
    assert any(r.spec_token_ids for r in engine.scheduler.running)
    for i in range(6):
        engine.abort_request(f"abort-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    assert spec.get_metrics()["kv_pages_used"] == 0
