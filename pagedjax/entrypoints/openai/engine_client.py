"""The engine in its own thread, and per-request async streams for the HTTP handlers.

`LLMEngine` is not thread-safe, so exactly one background thread owns it. That thread loops:
drain a command queue (add / abort / metrics), then run one `engine.step()` if any request is
unfinished, else block on the queue. Each step's `RequestOutput`s are pushed into the owning
request's `asyncio.Queue` with `loop.call_soon_threadsafe`, so a slow HTTP client never stalls the
batch: its outputs just pile up (they are cumulative, so only the latest matters).

A request whose consumer goes away (client disconnect -> task cancelled) is aborted in the
generator's `finally`, and the engine frees its KV pages at the next loop iteration.

Failures reach the stream as typed exceptions: `RequestFailedError` when the engine ended this
request because its step failed (the engine keeps serving everything else), `ShutdownAbortError`
when a shutdown's drain time ran out (`end_in_flight`), `EngineDeadError` when the thread stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("pagedjax.server")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a step raised, or the client was shut down)."""


class RequestFailedError(RuntimeError):
    """The engine ended this request because the step computing it failed (a server fault: 500).

    `output` is the request's last output (finish_reason "error"), so a stream can close its choices."""

    def __init__(self, message: str, output: RequestOutput | None = None):
        super().__init__(message)
        self.output = output


class ShutdownAbortError(RuntimeError):
    """The server is shutting down and its drain time ran out before this request finished."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    first_output_seen: bool = False


class AsyncEngineClient:
    """Owns an `LLMEngine` in a background thread; `generate()` is an async stream of outputs."""

    def __init__(self, engine, metrics_hook: Any = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.scheduler.config.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.model_path = engine.config.model
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.metrics_hook = metrics_hook  # object with on_finished(output) and on_abort()
        self.num_unstarted = 0  # requests admitted by the server that have no output yet (event loop side)
        self._last_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngineClient:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def end_in_flight(self) -> None:
        """Abort every request that still has a consumer; each stream gets `ShutdownAbortError`.

        Called when a shutdown's drain time runs out, so handlers answer cleanly (a final
        `finish_reason: "abort"` chunk, or an OpenAI-shaped 503) instead of being cancelled."""
        self._cmds.put(("end_in_flight",))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._cmds.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            try:
                block = not engine.has_unfinished_requests()
                cmds = []
                try:
                    cmds.append(self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait())
                    while True:
                        cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    pass
                for cmd in cmds:
                    self._handle(cmd)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    for out in outputs:
                        self._publish(out)
                self._last_metrics = engine.get_metrics()
            except BaseException as e:  # a failed step: fail every stream, stop serving
                logger.exception("engine step failed")
                self.error = e
                for rid, stream in list(self._streams.items()):
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(str(e)))
                    self._streams.pop(rid, None)
                break
        # Drain pending commands so no awaiting caller hangs.
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] in ("add", "call"):
                fut = cmd[-1]
                if not fut.done():
                    fut.set_exception(EngineDeadError("engine stopped"))

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, priority, stream, fut = cmd
            try:
                if isinstance(params, BeamSearchParams):
                    self.engine.add_beam_search_request(rid, prompt, params)
                else:
                    self.engine.add_request(rid, prompt, params, priority=priority)
            except BaseException as e:
                fut.set_exception(e)
                return
            self._streams[rid] = stream
            fut.set_result(None)
        elif kind == "abort":
            rid = cmd[1]
            if self._streams.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                if self.metrics_hook is not None:
                    self.metrics_hook.on_abort()
        elif kind == "end_in_flight":
            for rid, stream in list(self._streams.items()):
                self._streams.pop(rid, None)
                self.engine.abort_request(rid)
                err = ShutdownAbortError("The server is shutting down; the request was aborted.")
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:
                fut.set_exception(e)

    def _publish(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
            if self.metrics_hook is not None:
                self.metrics_hook.on_finished(out)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    # ------------------------------------------------------------------------------ async API
    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")

    async def call(self, fn, timeout: float = 30.0):
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        self._check_alive()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", fn, fut))
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)

    async def get_metrics(self) -> dict[str, Any]:
        try:
            return await self.call(lambda e: e.get_metrics(), timeout=5.0)
        except (EngineDeadError, TimeoutError):
            return dict(self._last_metrics)

    async def add(
        self, request_id: str, prompt: Any, params: SamplingParams, priority: int = 0
    ) -> asyncio.Queue:
        """Queue a request on the engine; raises the engine's error (e.g. InvalidRequestError)."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("add", request_id, prompt, params, priority, stream, fut))
        await asyncio.wrap_future(fut)
        return stream.queue

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    async def open(
        self, request_id: str, prompt: Any, params: SamplingParams, priority: int = 0
    ) -> RequestStream:
        """Add a request; raises the engine's error (e.g. InvalidRequestError) if it is rejected."""
        self.num_unstarted += 1
        try:
            q = await self.add(request_id, prompt, params, priority)
        except Exception:
            self.num_unstarted -= 1
            raise
        except BaseException:  # cancelled while adding: the request may be in the engine already
            self.num_unstarted -= 1
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, q)

    async def generate(
        self, request_id: str, prompt: Any, params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs (aborting it if the consumer stops early)."""
        stream = await self.open(request_id, prompt, params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()


class RequestStream:
    """Outputs of one engine request. Iterate it; `close()` aborts the request if it is unfinished.

    Outputs that piled up while the consumer was slow are coalesced: only the newest is yielded
    (outputs are cumulative, so nothing is lost).
    """

    def __init__(self, client: AsyncEngineClient, request_id: str, q: asyncio.Queue):
        self.client = client
        self.request_id = request_id
        self._q = q
        self.started = False
        self.finished = False
        self.closed = False
        self.last: RequestOutput | None = None

    def _mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.client.num_unstarted -= 1

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._q.get()
                while not isinstance(item, BaseException) and not item.finished and not self._q.empty():
                    item = self._q.get_nowait()
                self._mark_started()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                self.last = item
                if item.error is not None:
                    raise RequestFailedError(item.error, item)
                yield item
        finally:
            if not self.finished:
                self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._mark_started()
        if not self.finished:
            self.client.abort(self.request_id)

    async def final(self) -> RequestOutput:
        async for _ in self:
            pass
        assert self.last is not None
        return self.last
