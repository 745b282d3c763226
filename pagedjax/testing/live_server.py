"""A real uvicorn server on a free 127.0.0.1 port in a daemon thread, for tests and notebooks that
talk to the OpenAI-compatible app over HTTP (needs the `serve` extra)."""

from __future__ import annotations

import socket
import threading
import time


class LiveServer:
    """uvicorn serving `app` at `self.url` until `stop()`.

    With `client` and `drain_timeout`, it is the `pagedjax serve` server (`DrainingServer`): a stop
    lets requests in flight run for `drain_timeout` seconds, then ends them through the engine."""

    def __init__(self, app, start_timeout: float = 20.0, client=None, drain_timeout: float | None = None):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if drain_timeout is None:
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
            self.server = uvicorn.Server(config)
        else:
            from pagedjax.entrypoints.openai.api_server import DrainingServer

            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout + 10)
            self.server = DrainingServer(config, client, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + start_timeout
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
