"""The README's main command, `pagedjax generate`, on a small local model."""

from __future__ import annotations

import json

from pagedjax.entrypoints.cli import main


def test_generate_command_prints_completions(model_dir, capsys):
    rc = main(
        [
            "generate",
            model_dir("llama"),
            "--dtype",
            "float32",
            "--no-warmup",
            "--max-tokens",
            "5",
            "--max-num-seqs",
            "4",
            "--max-num-batched-tokens",
            "32",
            "--max-model-len",
            "128",
            "--kv-cache-memory",
            str(4 * 2**20),
            "--prompt",
            "hello world",
            "--prompt",
            "the cat",
            "--json",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello world", "the cat"]
    assert all(r["finish_reason"] in ("length", "stop") for r in rows)
    assert "tok/s" in captured.err
