"""lm-eval-harness against the server (issue 3, acceptance 6): its `local-completions` model runs a
multiple-choice (loglikelihood) task against a live pagedjax server, and every per-choice
loglikelihood equals what lm-eval's `hf` backend computes with transformers on the same float32 weights.

The task is a YAML config with a local jsonl dataset written into tmp_path (no dataset hub); the
model is a small random Llama from `pagedjax.testing.model_factory` (with its tokenizer), loaded by
the server and by lm-eval's `hf` model from the same folder. local-completions sends token ids
(`tokenized_requests`, the default) with `echo`, `logprobs: 1`, `max_tokens: 1`, and reads the prompt
token logprobs back; batch_size 4 makes it send lists of prompts in one request.
"""

from __future__ import annotations

import json
import time

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("torch")

import requests  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pagedjax import LLM  # noqa: E402
from pagedjax.entrypoints.openai.api_server import build_app  # noqa: E402
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient  # noqa: E402
from pagedjax.testing.live_server import LiveServer  # noqa: E402

MODEL = "tiny-llama"
# float32 on both sides: the engine's logits equal transformers' to ~1e-5 (tests/test_parity_hf.py),
# and a continuation's loglikelihood sums a few log-softmax values of O(1..10); 1e-3 absolute leaves
# ~100x headroom over the float32 noise while any real bug (off-by-one token, wrong position, missing
# BOS, a logprob of the wrong token) moves it by O(0.1..10).
ATOL = 1e-3

ITEMS = [
    ("The capital of France is", ["Paris", "Rome", "Tokyo", "London"], 0),
    ("The capital of Italy is", ["Paris", "Rome", "Tokyo", "Berlin"], 1),
    ("The capital of Japan is", ["Tokyo", "Rome", "Paris", "Madrid"], 0),
    ("The quick brown fox jumps over the", ["lazy dog", "moon", "river", "clock"], 0),
    ("Once upon a time, in a village at the edge of a great", ["forest", "city", "sea", "desert"], 0),
    ("Children came to watch the little brass", ["wheels turn", "birds", "cars", "trees"], 0),
    ("Paris is known for its museums, its bridges over the", ["Seine", "Thames", "Tiber", "Nile"], 0),
    ("Rome has ancient ruins, fountains and", ["churches", "bridges", "clocks", "rivers"], 0),
    ("Tokyo is one of the largest", ["cities in the world", "rivers", "villages", "forests"], 0),
    ("A small language model reads one token at a", ["time", "day", "place", "word"], 0),
    ("Every morning he opened the", ["shutters of his shop", "door", "window", "book"], 0),
    ("he told them stories about the mountains, the rivers and the", ["cities", "trees", "stars", "sea"], 0),
]


def _write_task(tmp_path) -> str:
    data = tmp_path / "tiny_mc.jsonl"
    with data.open("w") as f:
        for q, choices, answer in ITEMS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # JSON is valid YAML: no quoting surprises for paths or Jinja templates.
    config = {
        "task": "pagedjax_tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf_datasets")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (tasks / "pagedjax_tiny_mc.yaml").write_text(json.dumps(config, indent=2))
    return str(tasks)


def _loglikelihoods(results) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc_id, choice index) -> (loglikelihood, is_greedy) from simple_evaluate's logged samples."""
    out = {}
    for s in results["samples"]["pagedjax_tiny_mc"]:
        for j, resp in enumerate(s["resps"]):
            ll, greedy = resp[0]
            out[(s["doc_id"], j)] = (float(ll), bool(greedy))
    return out


def test_local_completions_matches_hf(model_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = model_dir("llama")
    include = _write_task(tmp_path)

    def run(model: str, model_args: dict):
        t0 = time.perf_counter()
        res = simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=["pagedjax_tiny_mc"],
            task_manager=TaskManager(include_path=include, include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
        return res, time.perf_counter() - t0

    hf_res, hf_s = run("hf", {"pretrained": path, "dtype": "float32", "device": "cpu", "batch_size": 8})

    llm = LLM(
        path,
        dtype="float32",
        block_size=4,
        num_kv_pages=64,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
        warmup=False,
        compilation_cache_dir="off",
    )
    # Prefix caching is on (the default): the 4 choices of a question share their context's pages,
    # and the echo-only request below repeats all 48 prompts, yet every prompt token must be scored.
    assert llm.llm_engine.config.cache.enable_prefix_caching
    client = AsyncEngineClient(llm.llm_engine).start()
    app = build_app(client, MODEL)
    bodies: list[dict] = []

    @app.middleware("http")
    async def _record(request, call_next):  # what lm-eval sends, for the checks below
        if request.url.path == "/v1/completions":
            bodies.append(json.loads(await request.body()))
        return await call_next(request)

    server = LiveServer(app)
    try:
        api_res, api_s = run(
            "local-completions",
            {
                "model": MODEL,
                "base_url": f"{server.url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": path,
                "tokenized_requests": True,
                "batch_size": 4,
                "num_concurrent": 1,
                "max_retries": 1,
                "max_length": 128,
            },
        )
        # The same numbers straight from the API with `max_tokens: 0` (vLLM's echo-only scoring): the
        # prompt's logprobs only, the first one null.
        samples = api_res["samples"]["pagedjax_tiny_mc"]
        pairs = [(s["doc_id"], j, *a) for s in samples for j, a in enumerate(s["arguments"])]
        tok = AutoTokenizer.from_pretrained(path)
        prompts, ctxlens = [], []
        for _, _, context, continuation in pairs:
            prompts.append(tok(context + continuation, add_special_tokens=False)["input_ids"])
            ctxlens.append(len(tok(context, add_special_tokens=False)["input_ids"]))
        r = requests.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        echo = r.json()
    finally:
        server.stop()
        client.shutdown()

    hf_ll, api_ll = _loglikelihoods(hf_res), _loglikelihoods(api_res)
    assert len(hf_ll) == sum(len(c) for _, c, _ in ITEMS)
    assert api_ll.keys() == hf_ll.keys()
    diffs = {k: abs(api_ll[k][0] - hf_ll[k][0]) for k in hf_ll}
    worst = max(diffs, key=diffs.get)
    print(f"hf {hf_s:.1f}s, local-completions {api_s:.1f}s; max |delta ll| = {diffs[worst]:.2e} at {worst}")
    assert diffs[worst] <= ATOL, (worst, api_ll[worst], hf_ll[worst])
    # Random weights: the loglikelihoods spread over several nats, so the comparison is not vacuous.
    lls = [v for v, _ in hf_ll.values()]
    assert max(lls) - min(lls) > 1.0
    assert {k: v[1] for k, v in api_ll.items()} == {k: v[1] for k, v in hf_ll.items()}
    # What lm-eval sent: token-id prompts in batches of 4, echo + logprobs + max_tokens 1.
    assert len(bodies) == len(hf_ll) // 4 + 1  # + the echo-only request above
    for b in bodies[:-1]:
        assert b["echo"] is True and b["max_tokens"] == 1 and b["logprobs"] == 1
        assert len(b["prompt"]) == 4 and all(isinstance(t, int) for p in b["prompt"] for t in p)

    assert echo["usage"]["completion_tokens"] == 0
    for (doc, j, *_), prompt, ctxlen, choice in zip(pairs, prompts, ctxlens, echo["choices"], strict=True):
        lp = choice["logprobs"]["token_logprobs"]
        assert len(lp) == len(prompt) and lp[0] is None and choice["finish_reason"] == "length"
        assert choice["text"] == tok.decode(prompt)
        assert abs(sum(lp[ctxlen:]) - hf_ll[(doc, j)][0]) <= ATOL

    acc_api = api_res["results"]["pagedjax_tiny_mc"]["acc,none"]
    acc_hf = hf_res["results"]["pagedjax_tiny_mc"]["acc,none"]
    assert acc_api == acc_hf
