#!/usr/bin/env python
"""Online serving benchmark against any OpenAI-compatible server (like vLLM's ``vllm bench serve``).

Sends streaming ``/v1/completions`` requests with Poisson arrivals at ``--request-rate`` (req/s; ``inf``
sends all at once) and/or at most ``--max-concurrency`` in flight, and reports completed/failed
requests, request throughput, output and total tok/s, and mean/median/p99 of TTFT, TPOT, ITL and
end-to-end latency (ms). Prompts are random token ids (``--dataset random``) or the first human turn of
ShareGPT conversations (``--dataset sharegpt --dataset-path FILE.json``, output length from the reply).

    pagedjax serve --port 8000 &
    python experiments/benchmark_serving.py --base-url http://127.0.0.1:8000 --num-prompts 100 \\
        --request-rate 4 --output-json serve.json

Output tokens are counted from the server's ``usage`` (``stream_options.include_usage``), falling back
to the number of streamed chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

try:
    import httpx
except ImportError:  # this environment ships httpx as `httpx2`
    import httpx2 as httpx


@dataclass
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def random_requests(n, input_len, output_len, range_ratio, vocab, seed) -> list[RequestSpec]:
    rng = np.random.default_rng(seed)
    lo_in, hi_in = max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio))
    lo_out, hi_out = max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio))
    out = []
    for _ in range(n):
        k = int(rng.integers(lo_in, hi_in + 1))
        ids = rng.integers(10, vocab, size=k).tolist()
        out.append(RequestSpec(ids, k, int(rng.integers(lo_out, hi_out + 1))))
    return out


def sharegpt_requests(path, n, tokenizer, seed, max_output=None) -> list[RequestSpec]:
    data = json.load(open(path))
    random.Random(seed).shuffle(data)
    out = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0]["value"], turns[1]["value"]
        p_len = len(tokenizer.encode(prompt)) if tokenizer else len(prompt.split())
        o_len = len(tokenizer.encode(reply)) if tokenizer else len(reply.split())
        if p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(RequestSpec(prompt, p_len, min(o_len, max_output or o_len)))
        if len(out) == n:
            break
    return out


async def send(client, url, model, spec: RequestSpec, ignore_eos: bool) -> RequestResult:
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    res = RequestResult(prompt_len=spec.prompt_len)
    t0 = time.perf_counter()
    last = t0
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0 or res.output_tokens > 0
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
    return res


def stats(values, prefix) -> dict:
    if not values:
        return {f"mean_{prefix}_ms": None, f"median_{prefix}_ms": None, f"p99_{prefix}_ms": None}
    a = np.asarray(values) * 1000
    return {
        f"mean_{prefix}_ms": float(a.mean()),
        f"median_{prefix}_ms": float(np.median(a)),
        f"p99_{prefix}_ms": float(np.percentile(a, 99)),
    }


async def run(args, specs: list[RequestSpec]) -> dict:
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=args.headers) as client:
        # one warm-up request (compiles, connection)
        await send(client, args.base_url, args.model, specs[0], args.ignore_eos)

        async def one(spec):
            if sem is None:
                return await send(client, args.base_url, args.model, spec, args.ignore_eos)
            async with sem:
                return await send(client, args.base_url, args.model, spec, args.ignore_eos)

        tasks = []
        t0 = time.perf_counter()
        for spec in specs:
            tasks.append(asyncio.create_task(one(spec)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "num_prompts": len(specs),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / elapsed,
        "output_throughput": out_tokens / elapsed,
        "total_token_throughput": (in_tokens + out_tokens) / elapsed,
        **stats([r.ttft for r in ok], "ttft"),
        **stats(tpots, "tpot"),
        **stats([x for r in ok for x in r.itl], "itl"),
        **stats([r.latency for r in ok], "e2el"),
    }
    if args.save_per_request:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def print_summary(s: dict) -> None:
    print(f"{'=' * 16} Serving Benchmark Result {'=' * 16}")
    for k, v in s.items():
        if k in ("requests", "errors"):
            continue
        print(f"{k:<32} {v:.2f}" if isinstance(v, float) else f"{k:<32} {v}")
    if s.get("errors"):
        print("errors:", *s["errors"], sep="\n  ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--tokenizer", default=None, help="HF tokenizer for ShareGPT lengths (default: words)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=None, help="random ids are < this (default 32000)")
    p.add_argument("--sharegpt-max-output", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals, req/s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", default=True)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--save-per-request", action="store_true")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.model is None:
        args.model = httpx.get(f"{args.base_url}/v1/models", headers=args.headers, timeout=30).json()["data"][
            0
        ]["id"]
    if args.dataset == "random":
        vocab = args.vocab_size or 32000
        specs = random_requests(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            vocab,
            args.seed,
        )
    else:
        if not args.dataset_path:
            p.error("--dataset sharegpt needs --dataset-path")
        tok = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        specs = sharegpt_requests(
            args.dataset_path, args.num_prompts, tok, args.seed, args.sharegpt_max_output
        )
    summary = asyncio.run(run(args, specs))
    summary.update(base_url=args.base_url, model=args.model, dataset=args.dataset)
    print_summary(summary)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
