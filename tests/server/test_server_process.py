"""The server as a process: `python -m pagedjax.entrypoints.openai MODEL` on 127.0.0.1; SIGTERM lets an
in-flight stream finish and the process exits 0. Also `pagedjax serve` argument parsing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

pytest.importorskip("fastapi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subcommand_parses():
    from pagedjax.entrypoints import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0


def test_process_sigterm_graceful(model_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PAGEDJAX_COMPILATION_CACHE": "off", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "pagedjax.entrypoints.openai",
        model_dir("llama"),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--block-size",
        "4",
        "--kv-cache-memory",
        str(1 << 20),
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "32",
        "--max-model-len",
        "128",
        "--no-warmup",
        "--served-model-name",
        "m",
        "--shutdown-timeout",
        "20",
        "--log-level",
        "warning",
    ]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"] == "m"

        first_chunk = threading.Event()
        result: dict = {}

        def stream():
            body = {
                "model": "m",
                "prompt": "Once upon a time",
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        result["done"] = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            result["usage"] = chunk["usage"]
                        first_chunk.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result.get("done") and result["usage"]["completion_tokens"] == 24
        assert proc.wait(30) == 0, open(tmp_path / "server.log").read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
