"""Prefix caching and parallel-sampling memory, measured in one run.

Workload: requests that share one long system prompt (~1,000 tokens) followed by a short distinct
question, arriving together (offline `LLM.generate`). The same workload runs on two engines over the
same model, prefix caching on and off, and the script reports mean/median TTFT, throughput and the
prompt tokens served from the cache, with the on/off ratios. Then it measures KV pool pages per
request for n=1 vs n=4 parallel samples of a ~1,000-token prompt (pages in use right after the
prompt step, and at the peak of the run).

    python experiments/benchmark_prefix_caching.py                   # bench125m, 32 requests
    python experiments/benchmark_prefix_caching.py --model default   # built-in SmolLM2-135M

Prints a table, writes JSON (--output) and a bar plot (--plot, if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_throughput import resolve_model  # noqa: E402


def make_workload(tokenizer, num_requests: int, system_len: int, seed: int) -> list[list[int]]:
    """A shared system prompt of `system_len` tokens + a distinct ~20-40 token question each."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab_size
    system = rng.integers(100, vocab - 100, size=system_len).tolist()
    return [
        system + rng.integers(100, vocab - 100, size=int(rng.integers(20, 41))).tolist()
        for _ in range(num_requests)
    ]


def run_engine(model, prompts, args, enable_prefix_caching: bool) -> dict:
    from pagedjax import LLM, SamplingParams

    llm = LLM(
        model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=2048,
        enable_prefix_caching=enable_prefix_caching,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5] * 40}], params, use_tqdm=False)  # touch every code path once
    llm.reset_prefix_cache()
    before = llm.get_metrics()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = llm.get_metrics()
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    total_tokens = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)
    res = {
        "prefix_caching": enable_prefix_caching,
        "seconds": elapsed,
        "mean_ttft_s": statistics.mean(ttft),
        "median_ttft_s": statistics.median(ttft),
        "requests_per_s": len(prompts) / elapsed,
        "total_tok_per_s": total_tokens / elapsed,
        "output_tok_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
        "cached_prompt_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
        "queried_prompt_tokens": after["prefix_cache_queries"] - before["prefix_cache_queries"],
        "outputs": [o.outputs[0].token_ids for o in outs],
    }
    res["memory"] = measure_parallel_sampling_memory(llm, prompts[0], args) if enable_prefix_caching else None
    return res


def measure_parallel_sampling_memory(llm, prompt: list[int], args) -> dict:
    """Pool pages in use for one request with n=1 and n=4 (after its prompt step, and at peak)."""
    from pagedjax import SamplingParams

    engine = llm.llm_engine
    out = {}
    for n in (1, 4):
        llm.reset_prefix_cache()
        params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True)
        rid = engine.add_request(None, {"prompt_token_ids": prompt}, params)
        after_prompt, peak = None, 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            peak = max(peak, engine.kv_cache.pool.num_used)
            if after_prompt is None and any(o.request_id == rid for o in outs):
                after_prompt = engine.kv_cache.pool.num_used
        out[n] = {"pages_after_prompt": after_prompt, "peak_pages": peak}
    out["block_size"] = engine.kv_cache.block_size
    out["prompt_tokens"] = len(prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench125m", help="'bench125m', 'default', a .gguf or an HF folder")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "pagedjax"))
    ap.add_argument("--output", default="prefix_caching_results.json")
    ap.add_argument("--plot", default="prefix_caching.png")
    args = ap.parse_args()

    spec = resolve_model(args.model, Path(args.cache_dir))
    prompts = make_workload(spec.load_tokenizer(), args.num_requests, args.system_len, args.seed)
    print(
        f"[workload] {len(prompts)} requests, shared prefix {args.system_len} tokens, "
        f"{sum(map(len, prompts))} prompt tokens, {args.output_len} output tokens each"
    )
    on = run_engine(spec.pagedjax_model, prompts, args, True)
    off = run_engine(spec.pagedjax_model, prompts, args, False)
    same = sum(a == b for a, b in zip(on["outputs"], off["outputs"], strict=True))

    print(f"\nmodel: {spec.name}")
    print(
        f"{'prefix caching':<16}{'mean TTFT s':>12}{'median TTFT s':>15}{'req/s':>8}{'total tok/s':>13}"
        f"{'cached prompt tok':>19}"
    )
    for r in (on, off):
        print(
            f"{'on' if r['prefix_caching'] else 'off':<16}"
            f"{r['mean_ttft_s']:>12.2f}{r['median_ttft_s']:>15.2f}"
            f"{r['requests_per_s']:>8.2f}{r['total_tok_per_s']:>13.1f}"
            f"{r['cached_prompt_tokens']:>10}/{r['queried_prompt_tokens']}"
        )
    ttft_ratio = off["mean_ttft_s"] / on["mean_ttft_s"]
    tput_ratio = on["total_tok_per_s"] / off["total_tok_per_s"]
    print(
        f"mean TTFT {ttft_ratio:.2f}x lower with caching (target >= 3x); throughput {tput_ratio:.2f}x; "
        f"greedy outputs identical on/off: {same}/{len(prompts)}"
    )
    mem = on["memory"]
    print(f"\nKV pages for one {mem['prompt_tokens']}-token prompt (block {mem['block_size']}):")
    print(f"{'n':<4}{'pages after prompt':>20}{'peak pages':>12}{'peak pages / sample':>22}")
    for n in (1, 4):
        m = mem[n]
        print(f"{n:<4}{m['pages_after_prompt']:>20}{m['peak_pages']:>12}{m['peak_pages'] / n:>22.1f}")

    for r in (on, off):
        r.pop("outputs")
    result = {
        "model": spec.name,
        "args": vars(args),
        "on": on,
        "off": off,
        "ttft_ratio": ttft_ratio,
        "throughput_ratio": tput_ratio,
        "identical_outputs": same,
    }
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.output}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(8, 3))
        ax[0].bar(["caching on", "caching off"], [on["mean_ttft_s"], off["mean_ttft_s"]])
        ax[0].set_ylabel("mean TTFT (s)")
        ax[1].bar(["caching on", "caching off"], [on["total_tok_per_s"], off["total_tok_per_s"]])
        ax[1].set_ylabel("total tok/s")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    except ImportError:
        print("(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
