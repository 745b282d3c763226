"""`POST /v1/chat/completions`: messages through the model's chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pagedjax.entrypoints.openai.engine_client import ShutdownAbortError
from pagedjax.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, random_id
from pagedjax.entrypoints.openai.serving_common import (
    ENGINE_FAILURES,
    SSE_DONE,
    OpenAIError,
    ServerState,
    chat_logprobs,
    close_all,
    make_sampling_params,
    merged,
    open_streams,
    openai_error_for,
    run_until_disconnect,
    sse,
    stop_holdback,
)
from pagedjax.outputs import RequestOutput


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        content = m.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        f"unsupported content part type {part.type!r} (only 'text')", param="messages"
                    )
                parts.append(part.text)
            text = "\n".join(parts)
        d = {"role": m.role, "content": text}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    kwargs: dict | None = None,
) -> tuple[str, list[int]]:
    tok = state.tokenizer
    if not messages:
        raise OpenAIError("messages must not be empty", param="messages")
    if getattr(tok, "chat_template", None) is None:
        raise OpenAIError("this model has no chat template; use /v1/completions", param="messages")
    msgs = messages_to_dicts(messages)
    try:
        extra = dict(kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True
            add_generation_prompt = False
        text = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except Exception as e:  # jinja errors (e.g. roles must alternate) are bad input
        raise OpenAIError(f"chat template failed: {e}", param="messages") from None
    return text, list(tok.encode(text, add_special_tokens=False))


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    state.check_model(req.model)
    if req.response_format is not None and req.response_format.type != "text":
        raise OpenAIError(
            f"response_format {req.response_format.type!r} is not supported (only 'text')",
            param="response_format",
        )
    if req.tools and req.tool_choice not in (None, "none"):
        raise OpenAIError("tool calling is not supported", param="tools")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise OpenAIError("top_logprobs must be >= 0", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = make_sampling_params(
        state, req, max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None
    )
    text, ids = render_chat(
        state, req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs
    )
    request_id = random_id("chatcmpl")
    created = int(time.time())
    model = req.model or state.model_name
    streams = await open_streams(
        state, request_id, [{"prompt": text, "prompt_token_ids": ids}], params, req.priority, req
    )
    if req.stream:
        return StreamingResponse(
            _stream(state, req, streams, request_id, created, model, len(ids)), media_type="text/event-stream"
        )

    async def collect() -> RequestOutput:
        return await streams[0].final()

    out = await run_until_disconnect(raw, collect(), lambda: close_all(streams))
    choices = []
    for o in out.outputs:
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": chat_logprobs(state, o.token_ids, o.logprobs or [], req.top_logprobs or 0)
                if req.logprobs
                else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
        )
    completion = sum(len(o.token_ids) for o in out.outputs)
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion,
                "total_tokens": len(ids) + completion,
            },
        }
    )


async def _stream(state, req, streams, request_id, created, model, n_prompt) -> AsyncIterator[str]:
    def chunk(choices, usage=None):
        d = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            d["usage"] = usage
        return sse(d)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    sent_tok = [0] * req.n
    sent_text = [0] * req.n
    last = None
    holdback = stop_holdback(req.stop)
    finished: set[int] = set()  # choice indices whose final chunk was sent
    try:
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(req.n)
            ]
        )
        async for _, out in merged(streams):
            last = out
            for o in out.outputs:
                i = o.index
                if o.finished:
                    finished.add(i)
                tf, xf = sent_tok[i], sent_text[i]
                if len(o.token_ids) == tf and not o.finished:
                    continue
                limit = len(o.text) if o.finished else max(xf, len(o.text) - holdback)
                delta = o.text[xf:limit]
                ids = o.token_ids[tf:]
                sent_tok[i], sent_text[i] = len(o.token_ids), limit
                lps = None
                if req.logprobs:
                    lps = chat_logprobs(state, ids, (o.logprobs or [])[tf:], req.top_logprobs or 0)
                if not delta and not o.finished and lps is None:
                    continue
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"content": delta} if delta or not o.finished else {},
                            "logprobs": lps,
                            "finish_reason": o.finish_reason if o.finished else None,
                            "stop_reason": o.stop_reason if o.finished else None,
                        }
                    ]
                )
        if include_usage:
            completion = sum(len(o.token_ids) for o in last.outputs) if last else 0
            yield chunk(
                [],
                {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": completion,
                    "total_tokens": n_prompt + completion,
                },
            )
        yield SSE_DONE
    except ShutdownAbortError:
        # The drain time ran out: close every open choice the way an abort does, then end the stream.
        aborted = [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": "abort", "stop_reason": None}
            for i in range(req.n)
            if i not in finished
        ]
        if aborted:
            yield chunk(aborted)
        yield SSE_DONE
    except ENGINE_FAILURES as e:
        yield sse(openai_error_for(e).body())
        yield SSE_DONE
    finally:
        close_all(streams)
