"""`EngineArgs`: every engine setting, once — its type, default, allowed values and help text.

The same fields are the keywords of `LLM(model, **kwargs)` and `LLMEngine.from_engine_args`, the
`--flags` of `pagedjax generate`, `pagedjax serve` and the benchmarks (`add_cli_args` builds them),
and the rows of the README's settings table (`settings_table`). A new capability adds its field here
and appears everywhere at once.

    args = EngineArgs(model="path/to/hf_folder", max_num_seqs=64)
    engine = LLMEngine.from_engine_args(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pagedjax.spec_decode.config import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16")
ATTENTION_BACKENDS = ("auto", "xla", "pallas", "cpu")
MATMUL_BACKENDS = ("auto", "xla", "cpu")
SCHEDULING_POLICIES = ("fcfs", "priority")


def _setting(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None):
    """A dataclass field carrying the metadata the CLI, the validation and the docs read."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class EngineArgs:
    """Settings of one engine. Plain data: print, compare and `dataclasses.replace` it in a notebook."""

    model: str | None = _setting(
        None,
        "Hugging Face folder (config.json + safetensors), .gguf file, or orbax checkpoint; "
        "None: the built-in SmolLM2-135M-Instruct (no download)",
    )
    dtype: str = _setting(
        "auto",
        "weights and activations; auto: bfloat16 on accelerators, on CPUs with AMX and on "
        "AMD Zen 4 (AVX-512 BF16), else float32",
        DTYPES,
    )
    seed: int = _setting(0, "seeds requests that carry no seed of their own")
    # --- KV cache
    block_size: int = _setting(16, "tokens per KV page", minimum=1)
    kv_cache_memory: int | None = _setting(
        None,
        "bytes for the KV page pool (default: 2 GiB on CPU, gpu_memory_utilization of the "
        "device on accelerators)",
        minimum=1,
    )
    kv_cache_dtype: str = _setting("auto", "page pool dtype; auto: the model dtype", DTYPES)
    gpu_memory_utilization: float = _setting(
        0.85, "accelerators: fraction of device memory for weights + KV pool", minimum=0.0
    )
    num_kv_pages: int | None = _setting(
        None, "exact number of KV pages (overrides kv_cache_memory; tests use tiny pools)", minimum=1
    )
    enable_prefix_caching: bool = _setting(True, "reuse the KV pages of prompt prefixes seen before")
    # --- scheduler
    max_num_seqs: int = _setting(256, "most sequences in one step", minimum=1)
    max_num_batched_tokens: int = _setting(1024, "token budget of one step", minimum=2)
    max_model_len: int | None = _setting(
        None, "longest prompt + output (default: the model's context length)", minimum=1
    )
    max_num_prefill_seqs: int = _setting(
        32, "most prefill chunks in one step (bounds the sampler's rows)", minimum=1
    )
    scheduling_policy: str = _setting(
        "fcfs", "fcfs, or priority (lower `priority` value first)", SCHEDULING_POLICIES
    )
    # --- execution
    attention_backend: str = _setting(
        "auto", "auto: the compiled CPU kernel on CPU, Pallas on GPU, XLA elsewhere", ATTENTION_BACKENDS
    )
    matmul_backend: str = _setting(
        "auto",
        "cpu: weights packed once for a compiled AVX-512/AMX kernel (auto picks it on CPU where it builds)",
        MATMUL_BACKENDS,
    )
    warmup: bool = _setting(True, "compile every step shape at start-up so no request waits for one")
    compilation_cache_dir: str | None = _setting(
        None,
        "persistent XLA compilation cache (default ~/.cache/pagedjax/xla, or "
        "$PAGEDJAX_COMPILATION_CACHE; 'off' disables)",
    )
    # --- speculative decoding
    speculative_config: str | None = _setting(
        None,
        'JSON (a dict for `LLM`), e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'; keys: '
        "method, num_speculative_tokens, prompt_lookup_min/max, disable_by_batch_size",
    )

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):  # LLM(speculative_config={...})
            self.speculative_config = json.dumps(self.speculative_config)
        hints = _field_types()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = hints[f.name]
            if value is None:
                if not optional:
                    raise ValueError(f"EngineArgs.{f.name} must not be None")
                continue
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if base is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # e.g. kv_cache_memory=2e9
                setattr(self, f.name, value)
            if not isinstance(value, base) or (base is int and isinstance(value, bool)):
                raise TypeError(
                    f"EngineArgs.{f.name} must be {base.__name__}{' or None' if optional else ''}, "
                    f"got {type(value).__name__} {value!r}"
                )
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            if choices and value not in choices:
                raise ValueError(f"EngineArgs.{f.name} must be one of {list(choices)}, got {value!r}")
            if minimum is not None and value < minimum:
                raise ValueError(f"EngineArgs.{f.name} must be >= {minimum}, got {value!r}")
        SpeculativeConfig.parse(self.speculative_config)  # a bad config fails here, clearly
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"EngineArgs.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Like `EngineArgs(**kwargs)`, but an unknown name raises TypeError naming the closest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid settings: {', '.join(names)}"
                raise TypeError(f"unknown engine setting {key!r}{hint}")
        return cls(**kwargs)

    @classmethod
    def add_cli_args(
        cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = ()
    ) -> None:
        """Add one `--flag` per field (`--no-flag` for booleans). `model` is added as `--model`;
        `pagedjax generate/serve` also accept it as a positional argument."""
        hints = _field_types()
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            base, _ = hints[f.name]
            help_text = f"{f.metadata['help']} (default: {f.default})"
            if base is bool:
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
                )
            else:
                parser.add_argument(
                    flag,
                    type=base,
                    default=f.default,
                    choices=f.metadata.get("choices"),
                    help=help_text,
                    metavar=None if f.metadata.get("choices") else f.name.upper(),
                )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineArgs:
        """The EngineArgs of parsed flags (fields a parser skipped keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls.from_kwargs(**{**values, **overrides})

    def to_kwargs(self) -> dict[str, Any]:
        """The fields as keywords (what `LLM(**kwargs)` takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, whether None is allowed), from the annotations."""
    out = {}
    for name, hint in get_type_hints(EngineArgs).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = next(a for a in args if a is not type(None))
            out[name] = (base, type(None) in args)
        else:
            out[name] = (hint, False)
    return out


def settings_table() -> str:
    """The fields as a Markdown table (the README's settings section is generated from this)."""
    rows = ["| setting (`LLM` keyword) | flag | default | meaning |", "|---|---|---|---|"]
    hints = _field_types()
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name][0] is bool:
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
        rows.append(f"| `{f.name}` | `{flag}` | `{f.default!r}` | {meaning} |")
    return "\n".join(rows)


def _write_readme(path: str = "README.md") -> None:
    """Replace the README's settings table (between its marker comments) with `settings_table()`."""
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    with open(path) as f:
        text = f.read()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{settings_table()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        _write_readme()
    else:
        print(settings_table())
