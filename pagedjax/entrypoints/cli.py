"""`pagedjax` command line: `pagedjax generate [MODEL] --prompt ...` (and `serve`, when installed)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Every engine knob as a flag (shared by `generate` and `serve`)."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV page pool")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "pallas", "cpu"])
    p.add_argument(
        "--matmul-backend",
        default="auto",
        choices=["auto", "xla", "cpu"],
        help="cpu: float32 weights packed for a compiled AVX-512 kernel (auto: where it builds)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV pages of prompt prefixes seen before (default: on)",
    )
    p.add_argument("--no-warmup", action="store_true", help="compile step shapes lazily instead of at start")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        seed=args.seed,
        attention_backend=args.attention_backend,
        matmul_backend=args.matmul_backend,
        enable_prefix_caching=args.enable_prefix_caching,
        warmup=not args.no_warmup,
    )


DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about paged memory.",
    "Explain continuous batching in one sentence.",
    "List three prime numbers:",
]


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedjax import LLM, SamplingParams

    prompts = args.prompt or DEFAULT_PROMPTS
    t0 = time.time()
    llm = LLM(args.model, **engine_kwargs(args))
    load_s = time.time() - t0
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sampling_seed
    )
    t0 = time.time()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.time() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    for p, o in zip(prompts, outs, strict=True):
        if args.json:
            print(
                json.dumps(
                    {"prompt": p, "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}
                )
            )
        else:
            print(f"--- {p!r}\n{o.outputs[0].text}\n")
    m = llm.get_metrics()
    print(
        f"[pagedjax] load+compile {load_s:.1f}s ({m['num_compiles']} programs); generated {n_out} tokens "
        f"for {len(prompts)} prompts in {gen_s:.2f}s ({n_out / gen_s:.1f} tok/s); "
        f"KV pages {m['kv_pages_total']}, mean waste {m['kv_waste_mean']:.1%}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for prompts (offline LLM API)")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few examples")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the `serve` extra)")
    add_engine_args(s)
    try:
        from pagedjax.entrypoints.openai.api_server import add_server_args
    except ImportError:  # fastapi/uvicorn missing: `serve` explains itself when run
        add_server_args = None
    if add_server_args is not None:
        add_server_args(s)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "serve":
        if add_server_args is None:
            print("pagedjax serve needs: pip install 'pagedjax[serve]'", file=sys.stderr)
            return 2
        from pagedjax.entrypoints.openai.api_server import run_server

        return run_server(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
