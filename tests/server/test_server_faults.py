"""A failing engine step on the live server (issue 20, part 5): only that step's requests get an
OpenAI-shaped 500 (non-streamed) or an error event (streamed), their pages are freed, `/health` stays
200 and later requests are served with the same greedy tokens. A shutdown whose drain time runs out
ends the requests in flight cleanly: streams get a final `finish_reason: "abort"` chunk, other
requests an OpenAI-shaped 503."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx2 as httpx
import pytest

pytest.importorskip("fastapi")

from pagedjax import LLM, SamplingParams  # noqa: E402
from pagedjax.entrypoints.openai.api_server import build_app  # noqa: E402
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient  # noqa: E402
from pagedjax.testing.live_server import LiveServer  # noqa: E402

MODEL = "m"
PROMPT = "The capital of France is"
TOKENS = 8


class FaultySteps:
    """Runner fault hook: after `skip` more steps, fails the next `fail_next` steps; sleeps `delay` s
    in every step."""

    def __init__(self):
        self.skip = 0
        self.fail_next = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    def __call__(self, sched_out) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.skip:
                self.skip -= 1
            elif self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("injected fault")


@pytest.fixture(scope="module")
def served(model_dir):
    llm = LLM(
        model_dir("llama"),
        dtype="float32",
        block_size=4,
        num_kv_pages=96,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=128,
        warmup=False,
        compilation_cache_dir="off",
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    expected = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    hook = FaultySteps()
    llm.llm_engine.runner.fault_hook = hook
    client = AsyncEngineClient(llm.llm_engine).start()
    server = LiveServer(build_app(client, MODEL))
    yield {"url": server.url, "client": client, "hook": hook, "expected": expected, "llm": llm}
    server.stop()
    client.shutdown()


def _body(**kw) -> dict:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **kw,
    }


def _engine_idle(client: AsyncEngineClient) -> dict:
    deadline = time.time() + 20
    while True:
        m = client.engine.get_metrics()
        if m["kv_pages_used"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0:
            return m
        assert time.time() < deadline, m
        time.sleep(0.05)


def _sse_events(url: str, path: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_failed_step_is_a_500_for_its_request_only(served):
    url, hook = served["url"], served["hook"]
    hook.fail_next = 1
    r = httpx.post(f"{url}/v1/completions", json=_body(), timeout=60)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "injected fault" in err["message"]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    _engine_idle(served["client"])
    ok = httpx.post(f"{url}/v1/completions", json=_body(), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == served["expected"]


def test_failed_step_ends_a_stream_with_an_error_event(served):
    url, hook = served["url"], served["hook"]
    for path, body in (
        ("/v1/completions", _body(stream=True)),
        ("/v1/chat/completions", {**_body(stream=True), "messages": [{"role": "user", "content": "hi"}]}),
    ):
        if "messages" in body:
            body.pop("prompt")
        hook.fail_next = 1
        events = _sse_events(url, path, body)
        assert events[-1] == "[DONE]"
        errors = [e for e in events[:-1] if "error" in e]
        assert len(errors) == 1 and errors[0]["error"]["code"] == 500, events
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    _engine_idle(served["client"])


def test_fault_amid_concurrent_requests_keeps_serving(served):
    """A fault while 8 requests run fails some of them (those in that step); every other request
    of the burst and every later one completes with the offline greedy text, and no page leaks."""
    url, hook = served["url"], served["hook"]

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(c.post(f"{url}/v1/completions", json=_body())) for _ in range(8)]
            return await asyncio.gather(*tasks)

    with hook.lock:
        hook.skip, hook.fail_next = 2, 1  # the burst's third step fails

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 500} and 500 in codes, codes
    assert all(
        r.json()["choices"][0]["text"] == served["expected"] for r in responses if r.status_code == 200
    )
    _engine_idle(served["client"])
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    ok = httpx.post(f"{url}/v1/completions", json=_body(), timeout=60)
    assert ok.json()["choices"][0]["text"] == served["expected"]


def test_drain_timeout_aborts_in_flight_requests_cleanly(served):
    """Stopping a `DrainingServer` whose drain time runs out: the stream ends with a final chunk
    `finish_reason: "abort"` and [DONE]; the non-streamed request gets an OpenAI-shaped 503."""
    hook, client = served["hook"], served["client"]
    server = LiveServer(build_app(client, MODEL), client=client, drain_timeout=0.5)
    url = server.url
    hook.delay = 0.05  # 100 tokens take ~5 s: far past the drain time
    try:
        result: dict = {}
        started = threading.Event()

        def stream():
            events = []
            with httpx.stream("POST", f"{url}/v1/completions", json=_body(max_tokens=100, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                        started.set()
            result["stream"] = events

        def plain():
            result["plain"] = httpx.post(f"{url}/v1/completions", json=_body(max_tokens=100), timeout=60)

        threads = [threading.Thread(target=f, daemon=True) for f in (stream, plain)]
        for t in threads:
            t.start()
        assert started.wait(30)
        time.sleep(0.2)
        server.stop(timeout=30)
        for t in threads:
            t.join(30)
    finally:
        hook.delay = 0.0
    events = result["stream"]
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "abort", events[-3:]
    assert result["plain"].status_code == 503
    assert result["plain"].json()["error"]["type"] == "service_unavailable"
    _engine_idle(client)
