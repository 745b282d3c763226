"""`POST /v1/completions` (OpenAI's legacy completions API, with vLLM's extras)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pagedjax.entrypoints.openai.engine_client import ShutdownAbortError
from pagedjax.entrypoints.openai.protocol import CompletionRequest, random_id
from pagedjax.entrypoints.openai.serving_common import (
    ENGINE_FAILURES,
    SSE_DONE,
    OpenAIError,
    ServerState,
    close_all,
    completion_logprobs,
    make_sampling_params,
    merged,
    open_streams,
    openai_error_for,
    run_until_disconnect,
    sse,
    stop_holdback,
)
from pagedjax.outputs import RequestOutput


def _normalize_prompts(state: ServerState, prompt: Any) -> list[dict]:
    """Every prompt as {"prompt": text, "prompt_token_ids": ids}."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise OpenAIError("prompt must not be empty", param="prompt")
    tok = state.tokenizer
    vocab = state.client.vocab_size
    out = []
    for p in items:
        if isinstance(p, str):
            out.append({"prompt": p, "prompt_token_ids": list(tok.encode(p))})
        else:
            ids = list(p)
            if not ids:
                raise OpenAIError("prompt must not be empty", param="prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append({"prompt": None, "prompt_token_ids": ids})
    return out


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    state.check_model(req.model)
    if req.suffix:
        raise OpenAIError("suffix is not supported", param="suffix")
    max_tokens = req.max_tokens
    echo_only = max_tokens == 0
    if echo_only and not req.echo:
        raise OpenAIError("max_tokens must be >= 1 (0 is only allowed with echo)", param="max_tokens")
    if req.best_of is not None and req.best_of < req.n:
        raise OpenAIError(f"best_of must be >= n ({req.n}), got {req.best_of}", param="best_of")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise OpenAIError("best_of > n is not supported with stream", param="best_of")
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = req.logprobs if prompt_logprobs is None else max(prompt_logprobs, req.logprobs)
    params = make_sampling_params(
        state,
        req,
        max_tokens=1 if echo_only else max_tokens,
        best_of=req.best_of,
        logprobs=req.logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    prompts = _normalize_prompts(state, req.prompt)
    for p in prompts:
        if p["prompt"] is None and req.echo:
            p["prompt"] = state.tokenizer.decode(p["prompt_token_ids"])
    request_id = random_id("cmpl")
    created = int(time.time())
    streams = await open_streams(state, request_id, prompts, params, req.priority, req)
    ctx = _Ctx(state, req, prompts, request_id, created, echo_only)
    if req.stream:
        return StreamingResponse(_stream(ctx, streams), media_type="text/event-stream")

    async def collect() -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in merged(streams):
            results[i] = out
        return results  # type: ignore[return-value]

    results = await run_until_disconnect(raw, collect(), lambda: close_all(streams))
    return JSONResponse(ctx.full_response(results))


class _Ctx:
    def __init__(self, state, req, prompts, request_id, created, echo_only):
        self.state, self.req, self.prompts = state, req, prompts
        self.request_id, self.created, self.echo_only = request_id, created, echo_only
        self.model = req.model or state.model_name

    def prompt_part(self, i: int, out: RequestOutput) -> tuple[str, dict | None]:
        """Echoed prompt text and its logprobs (with `echo`)."""
        p = self.prompts[i]
        text = p["prompt"] or ""
        lp = None
        if self.req.logprobs is not None:
            plp = out.prompt_logprobs or [None] * len(p["prompt_token_ids"])
            lp = completion_logprobs(self.state, p["prompt_token_ids"], plp, self.req.logprobs, 0)
        return text, lp

    def choice(
        self, i: int, out: RequestOutput, o, tok_from: int, text_from: int, first: bool, text_to=None
    ) -> dict:
        req = self.req
        text = "" if self.echo_only else o.text[text_from:text_to]
        ids = [] if self.echo_only else o.token_ids[tok_from:]
        lps = None
        prefix_text, prefix_lp = ("", None)
        if req.echo and first:
            prefix_text, prefix_lp = self.prompt_part(i, out)
        if req.logprobs is not None:
            gen_lp = (o.logprobs or [])[tok_from : tok_from + len(ids)]
            offset = (len(self.prompts[i]["prompt"] or "") if req.echo else 0) + text_from
            lps = completion_logprobs(self.state, ids, gen_lp, req.logprobs, offset)
            if prefix_lp is not None:
                lps = {k: prefix_lp[k] + lps[k] for k in lps}
        finish = o.finish_reason
        return {
            "index": i * req.n + o.index,
            "text": prefix_text + text,
            "logprobs": lps,
            "finish_reason": finish,
            "stop_reason": o.stop_reason,
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        """One streamed `text_completion` event."""
        d = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            d["usage"] = usage
        return d

    def usage(self, results: list[RequestOutput]) -> dict:
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in self.prompts)
        completion = 0 if self.echo_only else sum(len(o.token_ids) for r in results for o in r.outputs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def full_response(self, results: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(results):
            for o in out.outputs:
                c = self.choice(i, out, o, 0, 0, True)
                if self.echo_only:
                    c["finish_reason"] = "length"
                choices.append(c)
        choices.sort(key=lambda c: c["index"])
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(results),
        }


async def _stream(ctx: _Ctx, streams) -> AsyncIterator[str]:
    req = ctx.req
    sent_tok: dict[int, int] = {}
    sent_text: dict[int, int] = {}
    last: list[RequestOutput | None] = [None] * len(streams)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    holdback = stop_holdback(req.stop)
    finished: set[int] = set()  # choice indices whose final chunk was sent
    try:
        async for i, out in merged(streams):
            last[i] = out
            for o in out.outputs:
                idx = i * req.n + o.index
                if o.finished:
                    finished.add(idx)
                first = idx not in sent_tok
                tf, xf = sent_tok.get(idx, 0), sent_text.get(idx, 0)
                if not first and len(o.token_ids) == tf and not o.finished:
                    continue
                limit = len(o.text) if o.finished else max(xf, len(o.text) - holdback)
                c = ctx.choice(i, out, o, tf, xf, first, limit)
                if ctx.echo_only:
                    c["finish_reason"] = "length" if o.finished else None
                if not o.finished:
                    c["finish_reason"] = None
                    c["stop_reason"] = None
                sent_tok[idx], sent_text[idx] = len(o.token_ids), limit
                if not c["text"] and c["logprobs"] is None and c["finish_reason"] is None:
                    continue
                yield sse(ctx.chunk([c]))
        if include_usage:
            yield sse(ctx.chunk([], usage=ctx.usage([r for r in last if r])))
        yield SSE_DONE
    except OpenAIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except ShutdownAbortError:
        # The drain time ran out: close every open choice the way an abort does, then end the stream.
        for idx in range(len(streams) * req.n):
            if idx not in finished:
                c = {"index": idx, "text": "", "logprobs": None, "finish_reason": "abort"}
                yield sse(ctx.chunk([{**c, "stop_reason": None}]))
        yield SSE_DONE
    except ENGINE_FAILURES as e:
        yield sse(openai_error_for(e).body())
        yield SSE_DONE
    finally:
        close_all(streams)
