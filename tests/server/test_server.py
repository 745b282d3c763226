"""OpenAI-compatible server (issue 3): the official `openai` client against a live uvicorn server on
127.0.0.1 (a free port, in a background thread), sharing one small random Llama engine.

The offline reference outputs are computed with `LLM.generate` on the same engine object before the
server takes it over (so both paths use the same weights and compiled programs).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")

from pagedjax import LLM, SamplingParams  # noqa: E402
from pagedjax.entrypoints.openai.api_server import build_app  # noqa: E402
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient  # noqa: E402
from pagedjax.testing.live_server import LiveServer  # noqa: E402

MODEL = "test-llama"
API_KEY = "sk-test"
MAX_MODEL_LEN = 128
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "A small language model",
    "The quick brown fox",
    "Paris is known for its museums",
    "Children came to watch",
    "Rome has ancient ruins",
    "Tokyo is one of the largest",
]
GREEDY_TOKENS = 12


@pytest.fixture(scope="module")
def setup(model_dir):
    llm = LLM(
        model_dir("llama"),
        dtype="float32",
        block_size=4,
        num_kv_pages=96,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=MAX_MODEL_LEN,
        warmup=False,
        compilation_cache_dir="off",
        seed=0,
    )
    offline = llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True), use_tqdm=False
    )
    chat_offline = llm.chat(
        [{"role": "user", "content": "Tell me about Paris."}],
        SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )[0]
    client = AsyncEngineClient(llm.llm_engine).start()
    servers = {
        "main": LiveServer(build_app(client, MODEL)),
        "auth": LiveServer(build_app(client, MODEL, api_key=API_KEY)),
        "full": LiveServer(build_app(client, MODEL, max_waiting_requests=0)),
    }
    yield {
        "servers": servers,
        "client": client,
        "offline": {p: o.outputs[0].text for p, o in zip(PROMPTS, offline, strict=True)},
        "offline_ids": {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, offline, strict=True)},
        "chat_offline": chat_offline.outputs[0].text,
        "tokenizer": llm.get_tokenizer(),
    }
    for s in servers.values():
        s.stop()
    client.shutdown()


@pytest.fixture(scope="module")
def url(setup):
    return setup["servers"]["main"].url


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)


def _metrics(url) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0] if "{" in name and "le=" not in name else name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_version(url, oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{url}/version", timeout=5).json()["version"]


def test_tokenize_detokenize(url, setup):
    tok = setup["tokenizer"]
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}, timeout=10).json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    r2 = httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
    assert r2["prompt"] == tok.decode(r["tokens"])
    r3 = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r3.status_code == 200 and r3.json()["count"] > 2


# ---------------------------------------------------------------------------------------------- completions
def test_completion_greedy_matches_offline_and_usage(oai, setup):
    tok = setup["tokenizer"]
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[:3],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in r.choices] == [setup["offline"][p] for p in PROMPTS[:3]]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    n_prompt = sum(len(tok.encode(p)) for p in PROMPTS[:3])
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 3 * GREEDY_TOKENS
    assert r.usage.total_tokens == n_prompt + 3 * GREEDY_TOKENS


def test_completion_token_id_prompts(oai, setup):
    tok = setup["tokenizer"]
    ids = tok.encode(PROMPTS[0])
    r = oai.completions.create(
        model=MODEL, prompt=ids, max_tokens=GREEDY_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == setup["offline"][PROMPTS[0]]
    r = oai.completions.create(
        model=MODEL,
        prompt=[ids, tok.encode(PROMPTS[1])],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert len(r.choices) == 2


def test_completion_stream_matches_offline(oai, setup):
    stream = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[1],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert text == setup["offline"][PROMPTS[1]]
    assert finish == "length"
    assert usage.completion_tokens == GREEDY_TOKENS


def test_completion_n2_seeded_reproducible(oai):
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=2, seed=1234)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == sum(1 for _ in range(2)) * 8 or a.usage.completion_tokens <= 16
    c = oai.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_completion_best_of(oai):
    r = oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, n=1, best_of=3, seed=5)
    assert len(r.choices) == 1


def test_completion_logprobs_and_echo(oai, setup):
    tok = setup["tokenizer"]
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=4,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert l <= 0 and 3 <= len(top) <= 4 and top[t] == pytest.approx(l)
        assert l == pytest.approx(max(top.values()))  # greedy: the chosen token is the top-1
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # echo + max_tokens 0 (lm-eval's loglikelihood): prompt logprobs, no generated tokens
    ids = tok.encode(PROMPTS[3])
    r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(ids)
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    # echo with generation: prompt then completion
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=GREEDY_TOKENS,
        echo=True,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == PROMPTS[0] + setup["offline"][PROMPTS[0]]


def test_completion_stop_string(oai, setup):
    full = setup["offline"][PROMPTS[4]]
    stop = full[3:6]
    assert stop.strip(), full
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[4],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    s = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[4],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == full[: full.index(stop)]


def test_completion_vllm_extras_accepted(oai):
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"5": 2.0},
        user="u1",
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 6,
            "ignore_eos": True,
            "skip_special_tokens": False,
            "unknown_field": 1,
        },
    )
    assert r.usage.completion_tokens == 6


# ---------------------------------------------------------------------------------------------- chat
def test_chat_greedy_stream_and_not(oai, setup):
    msgs = [{"role": "user", "content": "Tell me about Paris."}]
    r = oai.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=GREEDY_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == setup["chat_offline"]
    assert r.usage.completion_tokens == GREEDY_TOKENS
    # text-part content and max_completion_tokens give the same
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about Paris."}]}]
    r2 = oai.chat.completions.create(
        model=MODEL,
        messages=parts,
        max_completion_tokens=GREEDY_TOKENS,
        temperature=0,
        response_format={"type": "text"},
        extra_body={"ignore_eos": True},
    )
    assert r2.choices[0].message.content == setup["chat_offline"]
    s = oai.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == setup["chat_offline"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == GREEDY_TOKENS
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_n2_logprobs_seed(oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    kw = dict(
        model=MODEL,
        messages=msgs,
        max_tokens=5,
        n=2,
        seed=7,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    a = oai.chat.completions.create(**kw)
    b = oai.chat.completions.create(**kw)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for c in a.choices:
        content = c.logprobs.content
        assert len(content) == 5
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
        joined = "".join(e.token for e in content)
        if "\ufffd" not in joined:  # (a token may be a partial UTF-8 sequence)
            assert joined == c.message.content
    assert a.usage.completion_tokens == 10


# ---------------------------------------------------------------------------------------------- errors
def _post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=30, **kw)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "hi", "logprobs": 100}, "logprobs"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": "word " * 300}, "prompt"),
        ({"prompt": "hi", "max_tokens": 500}, None),
        ({}, "prompt"),
    ],
)
def test_completion_400(url, body, param):
    r = _post(url, "/v1/completions", {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_bad_json_and_chat_400(url):
    r = httpx.post(
        f"{url}/v1/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    for body in (
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "hi " * 300}]},
    ):
        r = _post(url, "/v1/chat/completions", {"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _post(url, "/detokenize", {"tokens": [10**9]}).status_code == 400


def test_unknown_model_404(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_api_key_401(setup):
    url = setup["servers"]["auth"].url
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # health needs no key


def test_queue_full_503(setup):
    url = setup["servers"]["full"].url
    r = _post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------------------------- load
async def _stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stop_after=None):
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text, n, done = "", 0, False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"]
            n += 1
            if stop_after is not None and n >= stop_after:
                return None  # disconnect mid-stream
    assert done
    return text


def test_concurrent_streams_match_offline(url, setup):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_stream_one(client, url, p, GREEDY_TOKENS) for p in prompts))

    texts = asyncio.run(asyncio.wait_for(run(), 120))
    assert texts == [setup["offline"][p] for p in prompts]


def test_disconnects_free_pages_and_server_still_serves(url, oai, setup):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(
                *(_stream_one(client, url, PROMPTS[i % 8], 100, stop_after=2) for i in range(32))
            )
            # non-streaming clients that give up before the answer
            tasks = [
                asyncio.create_task(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True},
                    )
                )
                for _ in range(4)
            ]
            await asyncio.sleep(0.5)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(run(), 120))
    deadline = time.time() + 20
    while True:
        m = _metrics(url)
        if m["pagedjax:kv_cache_pages_used"] == 0 and m["pagedjax:num_requests_running"] == 0:
            break
        assert time.time() < deadline, m
        time.sleep(0.1)
    assert m["pagedjax:num_requests_waiting"] == 0
    assert m["pagedjax:request_success_total"] >= 1
    r = oai.completions.create(
        model=MODEL,
        prompt=PROMPTS[5],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == setup["offline"][PROMPTS[5]]


def test_metrics_exposition(url, oai):
    oai.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in (
        "pagedjax:num_requests_running",
        "pagedjax:num_requests_waiting",
        "pagedjax:kv_cache_usage_perc",
        "pagedjax:num_preemptions_total",
        "pagedjax:prompt_tokens_total",
        "pagedjax:generation_tokens_total",
        "pagedjax:time_to_first_token_seconds_bucket",
        "pagedjax:time_per_output_token_seconds_bucket",
        "pagedjax:e2e_request_latency_seconds_bucket",
        "pagedjax:request_queue_time_seconds_bucket",
        'pagedjax:request_success_total{finished_reason="length"',
    ):
        assert name in text, name


def test_benchmark_serving_script(url, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "benchmark_serving.py"
    spec = importlib.util.spec_from_file_location("benchmark_serving", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_serving"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    rc = mod.main(
        [
            "--base-url",
            url,
            "--num-prompts",
            "6",
            "--random-input-len",
            "8",
            "--random-output-len",
            "6",
            "--vocab-size",
            "500",
            "--request-rate",
            "50",
            "--max-concurrency",
            "4",
            "--output-json",
            str(out),
        ]
    )
    s = json.loads(out.read_text())
    assert rc == 0 and s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 36 and s["mean_ttft_ms"] > 0 and s["p99_itl_ms"] > 0


def test_soak_script(url, tmp_path):
    """The soak script against the live test server, briefly: every kind of request occurs, bad ones
    get their OpenAI-shaped 4xx, greedy probes agree, and no page is left in use."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "soak_server.py"
    spec = importlib.util.spec_from_file_location("soak_server", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soak_server"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    out = tmp_path / "soak.json"
    argv = [
        "--url",
        url,
        "--duration",
        "4",
        "--clients",
        "12",
        "--max-tokens",
        "12",
        "--output-json",
        str(out),
    ]
    rc = mod.main([*argv, "--bad-frac", "0.2", "--disconnect-frac", "0.2", "--greedy-every", "3"])
    s = json.loads(out.read_text())
    assert rc == 0, s["unexpected"]
    assert set(s["by_kind"]) == {"normal", "disconnect", "bad", "greedy"}, s["by_kind"]
    kinds = s["by_kind"]
    assert s["bad_rejected"] == kinds["bad"] and s["disconnected"] > 0
    # a request meant to hang up may finish first (a slow reader gets coalesced chunks)
    assert s["completed"] + s["disconnected"] == kinds["normal"] + kinds["greedy"] + kinds["disconnect"]
    assert s["greedy_consistent"] is True and s["kv_pages_used_at_end"] == 0 and s["health_at_end"] == 200
