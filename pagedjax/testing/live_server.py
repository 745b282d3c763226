"""A real uvicorn server on a free 127.0.0.1 port in a daemon thread, for tests and notebooks that
talk to the OpenAI-compatible app over HTTP (needs the `serve` extra)."""

from __future__ import annotations

import socket
import threading
import time


class LiveServer:
    """uvicorn serving `app` at `self.url` until `stop()`."""

    def __init__(self, app, start_timeout: float = 20.0):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + start_timeout
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
