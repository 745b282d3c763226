"""Helpers shared by the completions and chat handlers: errors, sampling params, logprobs, streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

from pagedjax.engine.llm_engine import InvalidRequestError
from pagedjax.entrypoints.openai.engine_client import (
    AsyncEngineClient,
    EngineDeadError,
    RequestFailedError,
    RequestStream,
    ShutdownAbortError,
)
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import BeamSearchParams, SamplingParams


class OpenAIError(Exception):
    """Becomes an OpenAI-shaped error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: int | str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code if code is not None else status
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What the engine's failures mean to an HTTP client: a failed step is the server's fault (500); a
# stopped engine or a shutdown that ran out of drain time is "unavailable, retry" (503).
ENGINE_FAILURES = (RequestFailedError, ShutdownAbortError, EngineDeadError)


def openai_error_for(exc: BaseException) -> OpenAIError:
    """The OpenAI-shaped error for one of `ENGINE_FAILURES`."""
    if isinstance(exc, RequestFailedError):
        return OpenAIError(str(exc), 500, type="server_error")
    return OpenAIError(str(exc), 503, type="service_unavailable")


def param_of(message: str) -> str | None:
    """SamplingParams' messages start with the offending field's name."""
    word = message.split(" ", 1)[0].strip(":,")
    return word if word.isidentifier() else None


@dataclass(eq=False)
class ServerState:
    client: AsyncEngineClient
    served_model_names: list[str]
    max_waiting_requests: int | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        return self.client.tokenizer

    def check_model(self, model: str | None) -> None:
        if model and model not in self.served_model_names:
            raise OpenAIError(
                f"The model `{model}` does not exist.", 404, param="model", code="model_not_found"
            )

    def check_capacity(self) -> None:
        if not self.client.is_alive:
            raise OpenAIError("The engine is not running.", 503, type="service_unavailable", code=503)
        limit = self.max_waiting_requests
        if limit is not None and self.client.num_unstarted >= limit:
            raise OpenAIError(
                f"Too many waiting requests (limit {limit}); retry later.",
                503,
                type="service_unavailable",
                code=503,
                headers={"Retry-After": "1"},
            )

    @lru_cache(maxsize=65536)  # noqa: B019 (one state object per app)
    def token_str(self, token_id: int) -> str:
        return self.client.tokenizer.decode([token_id])


def make_sampling_params(state: ServerState, req, **overrides: Any) -> SamplingParams:
    """SamplingParams from the request's fields; a bad value becomes a 400 naming the field.

    Token ids are checked against the vocabulary here, before the request reaches the engine (whose
    batched sampler packs them into int32 arrays): out-of-vocab `logit_bias` keys are a 400 (as in
    vLLM); `stop_token_ids` that can never be sampled are dropped and `top_k >= vocab` means "all
    tokens" (0), which changes no output.
    """
    vocab = state.client.vocab_size
    fields = dict(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logit_bias=req.logit_bias,
    )
    fields.update(overrides)
    if fields["top_k"] >= vocab:
        fields["top_k"] = 0
    if fields["stop_token_ids"]:
        fields["stop_token_ids"] = [t for t in fields["stop_token_ids"] if t < vocab]
    try:
        params = SamplingParams(**fields)
    except (ValueError, TypeError) as e:
        raise OpenAIError(str(e), 400, param=param_of(str(e))) from None
    bad = sorted(t for t in params.logit_bias or () if t >= vocab)
    if bad:
        raise OpenAIError(
            f"logit_bias token ids {bad[:8]} are out of the vocabulary (size {vocab})", param="logit_bias"
        )
    return params


def engine_params(req, params: SamplingParams) -> SamplingParams | BeamSearchParams:
    """What the engine gets: the sampling params, or beam-search params for `use_beam_search`
    (beam width = n; the n best hypotheses become the n choices)."""
    if not req.use_beam_search:
        return params
    for name, bad in (("stream", req.stream), ("logprobs", bool(getattr(req, "logprobs", None)))):
        if bad:
            raise OpenAIError(f"{name} is not supported with use_beam_search", param=name)
    try:
        return BeamSearchParams(
            beam_width=req.n,
            max_tokens=params.max_tokens or 16,
            length_penalty=req.length_penalty,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise OpenAIError(str(e), 400, param=param_of(str(e))) from None


async def open_streams(
    state: ServerState,
    base_id: str,
    prompts: list[dict],
    params: SamplingParams,
    priority: int,
    req: Any = None,
) -> list[RequestStream]:
    """Add every prompt to the engine, or none: a rejected one aborts those already added.
    With `req`: its `cache_salt` and `use_beam_search` extras apply."""
    state.check_capacity()
    if req is not None:
        params = engine_params(req, params)
        if req.cache_salt is not None:
            prompts = [{**p, "cache_salt": req.cache_salt} for p in prompts]
    streams: list[RequestStream] = []
    try:
        for i, p in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await state.client.open(rid, p, params, priority))
    except InvalidRequestError as e:
        close_all(streams)
        raise OpenAIError(str(e), 400, param="prompt" if "prompt" in str(e) else None) from None
    except EngineDeadError as e:
        close_all(streams)
        raise OpenAIError(str(e), 503, type="service_unavailable") from None
    except ValueError as e:
        close_all(streams)
        raise OpenAIError(str(e), 400, param=param_of(str(e))) from None
    except BaseException:
        close_all(streams)
        raise
    return streams


def close_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.close()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        close_all(streams)


async def listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnectedError(Exception):
    """The HTTP client went away before its (non-streamed) answer was ready."""


async def run_until_disconnect(request: Request, coro, on_disconnect: Callable[[], None]):
    """Await `coro`, but cancel it (and call on_disconnect) if the client goes away first."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(listen_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            on_disconnect()
            # Let the cancellation finish: a cancelled-but-pending task has no result to read.
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnectedError()
    return work.result()


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stop_holdback(stop: str | list[str] | None) -> int:
    """Characters to hold back while streaming: the engine's text may end with a partial stop string
    that is cut off once the stop string completes."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return max((len(s) - 1 for s in stops if isinstance(s, str)), default=0)


def finite(v: float | None) -> float | None:
    """JSON has no infinities: clamp like OpenAI/vLLM do."""
    if v is None:
        return None
    return max(float(v), -9999.0) if v == v else -9999.0


def sorted_top(d: dict[int, float] | None, k: int | None = None) -> list[tuple[int, float]]:
    if not d:
        return []
    items = sorted(d.items(), key=lambda kv: -kv[1])
    return items if k is None else items[:k]


def completion_logprobs(
    state: ServerState,
    token_ids: list[int],
    lp: list[dict[int, float] | None],
    num: int,
    offset: int,
) -> dict[str, Any]:
    """OpenAI legacy-completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for tid, d in zip(token_ids, lp, strict=False):
        s = state.token_str(tid)
        tokens.append(s)
        text_offset.append(offset)
        offset += len(s)
        if d is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(finite(d.get(tid)))
        entries = sorted_top(d, num)
        if tid in d and all(t != tid for t, _ in entries):
            entries.append((tid, d[tid]))
        top.append({state.token_str(t): finite(v) for t, v in entries})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }


def chat_logprobs(
    state: ServerState, token_ids: list[int], lp: list[dict[int, float]], num: int
) -> dict[str, Any]:
    content = []
    for tid, d in zip(token_ids, lp, strict=False):
        s = state.token_str(tid)
        content.append(
            {
                "token": s,
                "logprob": finite(d.get(tid, -9999.0)),
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": state.token_str(t),
                        "logprob": finite(v),
                        "bytes": list(state.token_str(t).encode("utf-8")),
                    }
                    for t, v in sorted_top(d, num)
                ],
            }
        )
    return {"content": content}
