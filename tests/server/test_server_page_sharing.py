"""Issue 5 on the server: prefix-cache metrics and POST /reset_prefix_cache, the `cache_salt` extra,
n > 1 sharing pages, and the `use_beam_search` extra equal to the offline `LLM.beam_search`."""

from __future__ import annotations

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from test_server import _metrics  # noqa: E402

from pagedjax import LLM, BeamSearchParams  # noqa: E402
from pagedjax.entrypoints.openai.api_server import build_app  # noqa: E402
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient  # noqa: E402
from pagedjax.testing.live_server import LiveServer  # noqa: E402

MODEL = "test-llama"
SYSTEM = "You are a helpful assistant who answers questions about cities and their history. " * 2


@pytest.fixture(scope="module")
def setup(model_dir):
    llm = LLM(
        model_dir("llama"),
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
    beams = llm.beam_search([SYSTEM + "Rome"], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True))
    client = AsyncEngineClient(llm.llm_engine).start()
    server = LiveServer(build_app(client, MODEL))
    yield {"url": server.url, "beams": [o.text for o in beams[0].outputs]}
    server.stop()
    client.shutdown()


@pytest.fixture(scope="module")
def oai(setup):
    return openai.OpenAI(base_url=f"{setup['url']}/v1", api_key="none", timeout=60, max_retries=0)


def test_prefix_cache_hits_metrics_and_reset(setup, oai):
    url = setup["url"]
    assert httpx.post(f"{url}/reset_prefix_cache", timeout=30).status_code == 200
    before = _metrics(url)
    for q in ("Paris", "Rome", "Tokyo"):
        oai.completions.create(model=MODEL, prompt=SYSTEM + q, max_tokens=2, temperature=0)
    m = _metrics(url)
    hits = m["pagedjax:prefix_cache_hits_total"] - before["pagedjax:prefix_cache_hits_total"]
    queries = m["pagedjax:prefix_cache_queries_total"] - before["pagedjax:prefix_cache_queries_total"]
    assert queries > 0 and hits > 0.5 * queries * 2 / 3, (hits, queries)  # 2nd and 3rd share SYSTEM
    assert m["pagedjax:kv_cache_pages_cached"] > 0
    r = httpx.post(f"{url}/reset_prefix_cache", timeout=30)
    assert r.status_code == 200 and r.json()["pages_dropped"] > 0
    assert _metrics(url)["pagedjax:kv_cache_pages_cached"] == 0


def test_use_beam_search_equals_offline(setup, oai):
    r = oai.completions.create(
        model=MODEL,
        prompt=SYSTEM + "Rome",
        max_tokens=6,
        n=2,
        extra_body={"use_beam_search": True, "ignore_eos": True},
    )
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == setup["beams"]
    assert r.usage.completion_tokens == 12


def test_use_beam_search_rejects_streaming(setup):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True, "use_beam_search": True}
    r = httpx.post(f"{setup['url']}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_cache_salt_extra(setup, oai):
    url = setup["url"]
    httpx.post(f"{url}/reset_prefix_cache", timeout=30)
    prompt = SYSTEM + "Lisbon"
    oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "a"})
    before = _metrics(url)["pagedjax:prefix_cache_hits_total"]
    oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "b"})
    assert _metrics(url)["pagedjax:prefix_cache_hits_total"] == before
    oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "a"})
    assert _metrics(url)["pagedjax:prefix_cache_hits_total"] > before
