"""OpenAI-compatible HTTP server over the pagedjax engine (FastAPI + uvicorn), modelled on vLLM's.

    pagedjax serve [MODEL] --host 127.0.0.1 --port 8000 [--api-key KEY] [--served-model-name NAME]
    python -m pagedjax.entrypoints.openai [MODEL] ...

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics (Prometheus).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

import pagedjax
from pagedjax.entrypoints.openai.engine_client import AsyncEngineClient
from pagedjax.entrypoints.openai.metrics import ServerMetrics
from pagedjax.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from pagedjax.entrypoints.openai.serving_chat import create_chat_completion, render_chat
from pagedjax.entrypoints.openai.serving_common import (
    ENGINE_FAILURES,
    ClientDisconnectedError,
    OpenAIError,
    ServerState,
    openai_error_for,
)
from pagedjax.entrypoints.openai.serving_completions import create_completion

logger = logging.getLogger("pagedjax.server")


def _error(
    status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None
):
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": type,
                "param": param,
                "code": code if code is not None else status,
            }
        },
        status_code=status,
        headers=headers,
    )


def build_app(
    engine_client: AsyncEngineClient,
    served_model_name: str | list[str] | None = None,
    api_key: str | None = None,
    max_waiting_requests: int | None = None,
) -> FastAPI:
    """The FastAPI app. The caller owns the client's lifecycle (`start()` before, `shutdown()` after)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if not names:
        names = [engine_client.model_path or "default"]
    state = ServerState(engine_client, names, max_waiting_requests)
    metrics = engine_client.metrics_hook
    if metrics is None:
        metrics = engine_client.metrics_hook = ServerMetrics(names[0])

    app = FastAPI(title="pagedjax OpenAI-compatible server", version=pagedjax.__version__)
    app.state.server = state

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        return _error(400, f"{'.'.join(loc) or 'body'}: {msg}", param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(
            exc.status_code,
            str(exc.detail),
            type="not_found" if exc.status_code == 404 else "invalid_request_error",
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(request: Request, exc: ClientDisconnectedError):
        # Nobody reads this (nginx's "client closed request" code); the request was aborted.
        return Response(status_code=499)

    async def _engine_failure(request: Request, exc: Exception):
        err = openai_error_for(exc)
        return JSONResponse(err.body(), status_code=err.status)

    for failure in ENGINE_FAILURES:
        app.add_exception_handler(failure, _engine_failure)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="internal_error")

    if api_key:

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                header = request.headers.get("authorization", "")
                if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                    return _error(
                        401,
                        "Incorrect or missing API key.",
                        type="authentication_error",
                        code="invalid_api_key",
                    )
            return await call_next(request)

    @app.get("/health")
    async def health():
        if not engine_client.is_alive:
            return _error(503, "engine is not running", type="service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": pagedjax.__version__}

    @app.get("/v1/models")
    async def models():
        cards = [
            ModelCard(
                id=n, root=engine_client.model_path or "default", max_model_len=engine_client.max_model_len
            )
            for n in names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id or "?")
        card = ModelCard(
            id=model_id, root=engine_client.model_path or "default", max_model_len=engine_client.max_model_len
        )
        return JSONResponse(card.model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await create_completion(state, body, raw)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, body, raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if body.messages is not None:
            _, ids = render_chat(state, body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tok = state.tokenizer
            ids = list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        else:
            raise OpenAIError("give `prompt` or `messages`", param="prompt")
        return {"count": len(ids), "max_model_len": engine_client.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = engine_client.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise OpenAIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Drop every cached prefix (vLLM's endpoint); running requests keep their pages."""
        dropped = await engine_client.call(lambda e: e.reset_prefix_cache())
        return {"pages_dropped": dropped}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        snap = await engine_client.get_metrics()
        return Response(metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------------------------------- CLI
def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 + Retry-After when this many requests wait for their first token",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish; then they are aborted "
        "(streams end with finish_reason 'abort', other requests get a 503)",
    )
    p.add_argument("--log-level", default="info")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown whose drain time runs out ends the requests still in flight
    through the engine (streams: a final `finish_reason: "abort"` chunk; others: an OpenAI-shaped
    503) instead of letting uvicorn cancel them into plain-text 500s."""

    def __init__(self, config: uvicorn.Config, client: AsyncEngineClient, drain_timeout: float):
        super().__init__(config)
        self.client = client
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        async def end_in_flight_later() -> None:
            await asyncio.sleep(self.drain_timeout)
            logger.warning("drain time (%.0f s) ran out; aborting requests in flight", self.drain_timeout)
            self.client.end_in_flight()

        timer = asyncio.create_task(end_in_flight_later())
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(args: argparse.Namespace) -> int:
    from pagedjax.engine.llm_engine import LLMEngine
    from pagedjax.entrypoints.cli_args import engine_args_from

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine_args = engine_args_from(args)
    engine = LLMEngine.from_engine_args(engine_args)
    client = AsyncEngineClient(engine).start()
    names = args.served_model_name or [engine_args.model or "default"]
    app = build_app(client, names, api_key=args.api_key, max_waiting_requests=args.max_waiting_requests)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # A backstop only: DrainingServer ends in-flight requests itself when the drain time runs out.
        timeout_graceful_shutdown=args.shutdown_timeout + 10.0,
    )
    server = DrainingServer(config, client, args.shutdown_timeout)
    # uvicorn re-raises the captured SIGTERM/SIGINT after its graceful shutdown; a no-op handler turns
    # that into a normal return, so a SIGTERM'd server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logger.info("serving %s on http://%s:%d", names[0], args.host, args.port)
    try:
        server.run()  # SIGTERM/SIGINT: stop accepting, let in-flight requests finish, then return
    finally:
        client.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    from pagedjax.entrypoints.cli_args import add_engine_args

    parser = argparse.ArgumentParser(
        prog="pagedjax-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_args(parser)
    add_server_args(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
