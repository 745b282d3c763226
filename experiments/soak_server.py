#!/usr/bin/env python
"""Soak test of the OpenAI-compatible server: many concurrent streaming clients for a bounded time.

Each of ``--clients`` workers loops until ``--duration`` runs out, sending streaming completions
(random prompts, lengths and temperatures). A ``--disconnect-frac`` share of requests hang up after
a few chunks; a ``--bad-frac`` share are bad requests (negative temperature, unknown model,
malformed JSON, over-long prompt, ...) that must get an OpenAI-shaped 4xx. One request in
``--greedy-every`` is a greedy probe from a fixed prompt set: every probe of a prompt must give the
same text whatever else shares its batch, and (when this script started the server) the text
offline `LLM.generate` gives.

At the end it reports requests completed, responses by status, the greedy probes' agreement, KV pages
in use once the clients are gone (must be 0) and the server's resident memory over the run.

    python experiments/soak_server.py                      # starts `pagedjax serve` on the built-in model
    python experiments/soak_server.py --duration 60 --clients 64
    python experiments/soak_server.py --url http://127.0.0.1:8000   # a server you started yourself
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    import httpx
except ImportError:  # the environment may ship it under another name
    import httpx2 as httpx

RESULTS = Path(__file__).resolve().parent / "results"

PROMPTS = [
    "Write a haiku about paged memory.",
    "Explain continuous batching to a new engineer.",
    "What is the capital of France?",
    "List three uses of a hash map.",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "def fibonacci(n):",
    "Summarize the plot of a heist movie in two sentences.",
]
GREEDY_PROMPTS = PROMPTS[:4]
GREEDY_TOKENS = 24


@dataclass
class Tally:
    """What the clients saw, merged over all workers."""

    by_kind: Counter = field(default_factory=Counter)  # normal / disconnect / bad / greedy
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or exception name) per request
    completed: int = 0  # normal and greedy streams that reached [DONE] with a finish_reason
    disconnected: int = 0
    bad_rejected: int = 0  # bad requests answered 4xx with {"error": {...}}
    unexpected: list[str] = field(default_factory=list)  # anything that should not happen (first 20)
    output_tokens: int = 0
    greedy: dict[str, Counter] = field(default_factory=dict)  # prompt -> Counter(text)

    def oops(self, what: str) -> None:
        if len(self.unexpected) < 20:
            self.unexpected.append(what)
        self.statuses["unexpected"] += 1


def bad_request(rng: random.Random, model: str) -> tuple[str, dict | str, int]:
    """(description, JSON body or raw text, expected status)."""
    base = {"model": model, "prompt": "hello", "max_tokens": 8}
    return rng.choice(
        [
            ("negative temperature", {**base, "temperature": -1.0}, 400),
            ("max_tokens < 0", {**base, "max_tokens": -3}, 400),
            ("n = 0", {**base, "n": 0}, 400),
            ("unknown model", {**base, "model": "no-such-model"}, 404),
            ("malformed JSON", '{"model": "x", "prompt": ', 400),
            ("prompt over max_model_len", {**base, "prompt": "word " * 20000}, 400),
        ]
    )


async def stream_request(client, url: str, body: dict, hang_up_after: int | None, tally: Tally) -> str | None:
    """One streaming completion; returns its text (None when it hung up or failed)."""
    text, chunks, finish = [], 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        tally.statuses[r.status_code] += 1
        if r.status_code != 200:
            tally.oops(f"HTTP {r.status_code} for a good request: {(await r.aread())[:200]!r}")
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.oops(f"error event: {chunk['error']}")
                return None
            if chunk.get("usage"):
                tally.output_tokens += chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                text.append(c.get("text") or "")
                finish = c.get("finish_reason") or finish
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                tally.disconnected += 1
                return None  # leaving the block closes the connection mid-stream
    if finish is None:
        tally.oops("stream ended without a finish_reason")
        return None
    tally.completed += 1
    return "".join(text)


async def worker(i: int, args, model: str, deadline: float, tally: Tally) -> None:
    rng = random.Random(args.seed * 100_003 + i)
    n = 0
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        while time.monotonic() < deadline:
            n += 1
            roll = rng.random()
            try:
                if roll < args.bad_frac:
                    tally.by_kind["bad"] += 1
                    what, body, expected = bad_request(rng, model)
                    if isinstance(body, str):
                        headers = {"content-type": "application/json"}
                        r = await client.post(f"{args.url}/v1/completions", content=body, headers=headers)
                    else:
                        r = await client.post(f"{args.url}/v1/completions", json=body)
                    tally.statuses[r.status_code] += 1
                    err = (
                        r.json().get("error")
                        if r.headers.get("content-type", "").startswith("application/json")
                        else None
                    )
                    if r.status_code == expected and isinstance(err, dict) and "message" in err:
                        tally.bad_rejected += 1
                    else:
                        tally.oops(f"{what}: HTTP {r.status_code} {r.text[:200]!r} (expected {expected})")
                    continue
                if n % args.greedy_every == 0:
                    tally.by_kind["greedy"] += 1
                    prompt = rng.choice(GREEDY_PROMPTS)
                    body = {
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": GREEDY_TOKENS,
                        "temperature": 0,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    text = await stream_request(client, args.url, body, None, tally)
                    if text is not None:
                        tally.greedy.setdefault(prompt, Counter())[text] += 1
                    continue
                disconnect = roll < args.bad_frac + args.disconnect_frac
                tally.by_kind["disconnect" if disconnect else "normal"] += 1
                body = {
                    "model": model,
                    "prompt": rng.choice(PROMPTS),
                    "max_tokens": rng.randint(8, args.max_tokens),
                    "temperature": rng.choice([0.0, 0.7, 1.0]),
                    "top_p": rng.choice([1.0, 0.9]),
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                await stream_request(client, args.url, body, rng.randint(1, 4) if disconnect else None, tally)
            except (httpx.HTTPError, OSError) as e:
                tally.statuses[type(e).__name__] += 1
                tally.oops(f"{type(e).__name__}: {e}")


def scrape_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line.split(" ")[0]:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out.setdefault(name.split("{")[0], float(value))
    return out


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedjax.entrypoints.openai"]
    if args.model:
        cmd.append(args.model)
    cmd += ["--port", str(port), "--served-model-name", "soak", "--log-level", "warning"]
    cmd += shlex.split(args.server_args)
    log = open(args.server_log, "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {args.server_log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not come up in {args.start_timeout} s; see {args.server_log}")
        time.sleep(0.5)


def offline_greedy(args) -> dict[str, str]:
    """What `LLM.generate` gives for the greedy probes, with the same engine flags as the server."""
    from pagedjax import LLM, SamplingParams
    from pagedjax.entrypoints.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns, _ = parser.parse_known_args(([args.model] if args.model else []) + shlex.split(args.server_args))
    llm = LLM(**engine_args_from(ns).to_kwargs())
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = llm.generate(GREEDY_PROMPTS, params, use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(GREEDY_PROMPTS, outs, strict=True)}


async def soak(args, model: str, pid: int | None) -> tuple[Tally, list[tuple[float, float | None]]]:
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    memory: list[tuple[float, float | None]] = [(0.0, rss_mib(pid))]

    async def sample_memory() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(10.0, max(args.duration / 20, 0.5)))
            memory.append((round(time.monotonic() - t0, 1), rss_mib(pid)))

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(worker(i, args, model, deadline, tally) for i in range(args.clients)))
    sampler.cancel()
    memory.append((round(time.monotonic() - t0, 1), rss_mib(pid)))
    return tally, memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="soak this running server instead of starting one")
    p.add_argument("--model", default=None, help="model for the started server (default: the built-in one)")
    p.add_argument("--server-args", default="--max-num-seqs 64", help="extra `pagedjax serve` flags")
    p.add_argument("--server-log", default="/tmp/pagedjax-soak-server.log")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--served-model-name", default=None, help="model name to send (default: the server's)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 5 minutes)")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--disconnect-frac", type=float, default=0.10)
    p.add_argument("--bad-frac", type=float, default=0.05)
    p.add_argument("--greedy-every", type=int, default=10, help="every k-th request is a greedy probe")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-offline-check", action="store_true", help="skip comparing probes with LLM.generate")
    p.add_argument("--output-json", default=str(RESULTS / "soak_server.json"))
    args = p.parse_args(argv)

    proc = None
    if args.url is None:
        proc, args.url = start_server(args)
    try:
        pid = proc.pid if proc is not None else None
        model = (
            args.served_model_name or httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
        )
        t0 = time.perf_counter()
        tally, memory = asyncio.run(soak(args, model, pid))
        elapsed = time.perf_counter() - t0
        deadline = time.time() + 30  # aborted requests are freed at the engine's next iteration
        while True:
            m = scrape_metrics(args.url)
            idle = (
                m.get("pagedjax:num_requests_running", 0) == 0
                and m.get("pagedjax:num_requests_waiting", 0) == 0
            )
            if (idle and m.get("pagedjax:kv_cache_pages_used", 0) == 0) or time.time() > deadline:
                break
            time.sleep(0.2)
        health = httpx.get(f"{args.url}/health", timeout=10).status_code
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)

    consistent = {p: len(c) == 1 for p, c in tally.greedy.items()}
    offline = None
    if proc is not None and not args.no_offline_check:
        offline = offline_greedy(args)
    matches_offline = (
        {p: set(c) == {offline[p]} for p, c in tally.greedy.items()} if offline is not None else None
    )
    mem = [v for _, v in memory if v is not None]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_name(),
        "config": {k: v for k, v in vars(args).items() if k not in ("server_log",)},
        "elapsed_s": round(elapsed, 1),
        "requests": sum(tally.by_kind.values()),
        "by_kind": dict(tally.by_kind),
        "completed": tally.completed,
        "disconnected": tally.disconnected,
        "bad_rejected": tally.bad_rejected,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=lambda kv: str(kv[0]))},
        "unexpected": tally.unexpected,
        "output_tokens": tally.output_tokens,
        "output_tok_per_s": round(tally.output_tokens / elapsed, 1),
        "greedy_probes": sum(sum(c.values()) for c in tally.greedy.values()),
        "greedy_consistent": all(consistent.values()) if consistent else None,
        "greedy_matches_offline": all(matches_offline.values()) if matches_offline else None,
        "kv_pages_used_at_end": m.get("pagedjax:kv_cache_pages_used"),
        "requests_running_at_end": m.get("pagedjax:num_requests_running"),
        "health_at_end": health,
        "server_rss_mib": memory,
        # From the first sample under load (buffers and compiled shapes settle) to the end: a leak
        # shows as growth that keeps going; the start-to-end figure includes that settling.
        "server_rss_growth_mib": round(mem[-1] - mem[1], 1) if len(mem) > 2 else None,
        "server_rss_growth_from_start_mib": round(mem[-1] - mem[0], 1) if len(mem) > 1 else None,
    }
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    for key in (
        "elapsed_s",
        "requests",
        "by_kind",
        "completed",
        "disconnected",
        "bad_rejected",
        "statuses",
        "output_tok_per_s",
        "greedy_probes",
        "greedy_consistent",
        "greedy_matches_offline",
        "kv_pages_used_at_end",
        "health_at_end",
        "server_rss_growth_mib",
        "server_rss_growth_from_start_mib",
    ):
        print(f"{key:24s} {report[key]}")
    for line in tally.unexpected:
        print("unexpected:", line)
    ok = (
        not tally.unexpected
        and report["kv_pages_used_at_end"] == 0
        and health == 200
        and report["greedy_consistent"] is not False
        and report["greedy_matches_offline"] is not False
    )
    return 0 if ok else 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
