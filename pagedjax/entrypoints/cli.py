"""`pagedjax` command line: `generate` (offline batch), `chat` (interactive, streaming) and `serve`
(the OpenAI-compatible server). Every engine setting is a flag, generated from `EngineArgs`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pagedjax.entrypoints.cli_args import add_engine_args, engine_args_from

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about paged memory.",
    "Explain continuous batching in one sentence.",
    "List three prime numbers:",
]


def _is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedjax import LLM, SamplingParams

    prompts = args.prompt or DEFAULT_PROMPTS
    t0 = time.time()
    llm = LLM(**engine_args_from(args).to_kwargs())
    load_s = time.time() - t0
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sampling_seed
    )
    # Instruct models answer messages, not raw text: without --raw, prompts go through the chat
    # template (as LLM.chat does) whenever the tokenizer has one.
    as_chat = not args.raw and _is_chat_model(llm.get_tokenizer())
    t0 = time.time()
    if as_chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.time() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if args.json:
        for p, o in zip(prompts, outs, strict=True):
            row = {"prompt": p, "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}
            print(json.dumps({**row, **_timing(o)}))
    else:
        print(_results_table(prompts, outs))
    m = llm.get_metrics()
    print(
        f"[pagedjax] {'chat template' if as_chat else 'raw completion'}; load+compile {load_s:.1f}s "
        f"({m['num_compiles']} programs); generated {n_out} tokens for {len(prompts)} prompts in "
        f"{gen_s:.2f}s ({n_out / gen_s:.1f} tok/s); KV pages {m['kv_pages_total']}, "
        f"mean waste {m['kv_waste_mean']:.1%}",
        file=sys.stderr,
    )
    return 0


def _timing(out) -> dict:
    """Tokens, time to first token and decode rate of one finished request."""
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    ttft = m.time_to_first_token if m else None
    e2e = m.e2e_latency if m else None
    return {
        "tokens": n,
        "ttft_s": round(ttft, 4) if ttft is not None else None,
        "tok_per_s": round(n / e2e, 1) if e2e else None,
    }


def _results_table(prompts: list[str], outs) -> str:
    """prompt -> answer, with tokens, TTFT and tok/s per request, as an aligned text table."""
    lines = []
    for p, o in zip(prompts, outs, strict=True):
        t = _timing(o)
        answer = " ".join(o.outputs[0].text.split())
        ttft = f"{t['ttft_s'] * 1000:.0f} ms" if t["ttft_s"] is not None else "-"
        lines.append(f"> {p}\n  {answer}")
        lines.append(f"  [{t['tokens']} tokens, TTFT {ttft}, {t['tok_per_s'] or 0:.1f} tok/s]\n")
    return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation, tokens streamed as they are generated (like `vllm chat`)."""
    from pagedjax import LLM, SamplingParams

    llm = LLM(**engine_args_from(args).to_kwargs())
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    history: list[dict[str, str]] = []
    if args.system_prompt:
        history.append({"role": "system", "content": args.system_prompt})
    print("pagedjax chat: type a message; '/reset' clears the conversation, '/exit' or EOF quits.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system_prompt else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        rid = engine.add_request(None, llm.render_chat(history), params)
        shown, t0, first = "", time.time(), None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if out.error is not None:
                    print(f"\n[error] {out.error}")
                    history.pop()
                    break
                new = out.outputs[0].text
                if new != shown:
                    first = first or time.time()
                    print(new[len(shown) :], end="", flush=True)
                    shown = new
                if out.finished:
                    n = len(out.outputs[0].token_ids)
                    dt = time.time() - t0
                    history.append({"role": "assistant", "content": shown})
                    print(f"\n[{n} tokens, TTFT {((first or t0) - t0) * 1000:.0f} ms, {n / dt:.1f} tok/s]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate answers for prompts (offline LLM API)")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few examples")
    g.add_argument(
        "--raw", action="store_true", help="send prompts as raw completions, not through the chat template"
    )
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    c = sub.add_parser("chat", help="interactive chat with streamed answers")
    add_engine_args(c)
    c.add_argument("--system-prompt", default=None)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-p", type=float, default=0.95)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the `serve` extra)")
    add_engine_args(s)
    try:
        from pagedjax.entrypoints.openai.api_server import add_server_args
    except ImportError:  # fastapi/uvicorn missing: `serve` explains itself when run
        add_server_args = None
    if add_server_args is not None:
        add_server_args(s)
    s.set_defaults(server_available=add_server_args is not None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "chat":
        return cmd_chat(args)
    if args.command == "serve":
        if not args.server_available:
            print("pagedjax serve needs: pip install 'pagedjax[serve]'", file=sys.stderr)
            return 2
        from pagedjax.entrypoints.openai.api_server import run_server

        return run_server(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
