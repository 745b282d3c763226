"""Speculative decoding on the OpenAI server: streamed completions (several tokens per delta) equal
offline generation without speculation, and the spec_decode counters reach /metrics."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from test_server import _metrics  # noqa: E402

from pagedjax import LLM, SamplingParams  # noqa: E402
from pagedjax.entrypoints.openai.api_server import build_app  # noqa: E402
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient  # noqa: E402
from pagedjax.testing.live_server import LiveServer  # noqa: E402

MODEL = "test-llama"
PROMPTS = ["one two three one two three one two", "the cat sat on the mat the cat sat on", "abc abc abc abc"]
SETTINGS = dict(
    dtype="float32",
    block_size=4,
    num_kv_pages=128,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_model_len=128,
    warmup=False,
    compilation_cache_dir="off",
    seed=0,
)


@pytest.fixture(scope="module")
def setup(model_dir):
    path = model_dir("llama")
    plain = LLM(path, **SETTINGS)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].text for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    plain.shutdown()
    spec = LLM(
        path,
        speculative_config='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}',
        **SETTINGS,
    )
    client = AsyncEngineClient(spec.llm_engine).start()
    server = LiveServer(build_app(client, MODEL))
    yield {"url": server.url, "expected": expected}
    server.stop()
    client.shutdown()


@pytest.fixture(scope="module")
def oai(setup):
    return openai.OpenAI(base_url=f"{setup['url']}/v1", api_key="none", timeout=60, max_retries=0)


def test_streamed_speculative_completions_equal_plain_offline(setup, oai):
    before = _metrics(setup["url"]).get("pagedjax:spec_decode_num_accepted_tokens_total", 0.0)
    for prompt, want in zip(PROMPTS, setup["expected"], strict=True):
        stream = oai.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
        full = oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        assert full.choices[0].text == want and full.usage.completion_tokens == 24
    m = _metrics(setup["url"])
    assert m["pagedjax:spec_decode_num_draft_tokens_total"] > 0
    assert m["pagedjax:spec_decode_num_accepted_tokens_total"] > before
