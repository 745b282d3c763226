"""Engine flags shared by `pagedjax generate`, `chat` and `serve` (all generated from EngineArgs)."""

from __future__ import annotations

import argparse

from pagedjax.engine_args import EngineArgs


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model as an optional positional argument, then one flag per `EngineArgs` field."""
    p.add_argument(
        "model_positional",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF folder or .gguf file (default: built-in SmolLM2-135M-Instruct); same as --model",
    )
    EngineArgs.add_cli_args(p)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """The EngineArgs of parsed flags (a positional MODEL wins over --model)."""
    positional = getattr(args, "model_positional", None)
    return EngineArgs.from_cli_args(args, model=positional if positional is not None else args.model)
