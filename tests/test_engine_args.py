"""EngineArgs is the one source of engine settings: every field is a CLI flag of `generate`, `chat`,
`serve` and the throughput benchmark, and an `LLM` keyword; bad names and values fail clearly."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

from pagedjax import LLM, EngineArgs
from pagedjax.engine.llm_engine import LLMEngine
from pagedjax.engine_args import settings_table
from pagedjax.entrypoints.cli import build_parser

FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]
REPO = Path(__file__).resolve().parents[1]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_every_field_is_a_flag_of_each_command(command):
    flags = _flags(_subparser(command))
    missing = [f for f in FIELDS if "--" + f.replace("_", "-") not in flags]
    assert not missing, f"`pagedjax {command}` lacks flags for {missing}"


def test_every_field_is_a_benchmark_flag():
    path = REPO / "experiments" / "benchmark_throughput.py"
    spec = importlib.util.spec_from_file_location("benchmark_throughput_flags", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    flags = _flags(mod.build_parser())
    missing = [f for f in FIELDS if "--" + f.replace("_", "-") not in flags]
    assert not missing, f"benchmark_throughput.py lacks flags for {missing}"


def test_flags_parse_into_the_same_engine_args():
    args = _subparser("generate").parse_args(
        ["some/model", "--max-num-seqs", "7", "--no-enable-prefix-caching", "--dtype", "float32"]
    )
    from pagedjax.entrypoints.cli_args import engine_args_from

    ea = engine_args_from(args)
    assert ea == EngineArgs(model="some/model", max_num_seqs=7, enable_prefix_caching=False, dtype="float32")
    # --model works as well as the positional
    args = _subparser("serve").parse_args(["--model", "m2", "--no-warmup"])
    assert engine_args_from(args).model == "m2" and engine_args_from(args).warmup is False
    spec = '{"method": "ngram", "num_speculative_tokens": 4}'
    args = _subparser("serve").parse_args(["--speculative-config", spec])
    assert engine_args_from(args).speculative_config == spec


def test_every_field_is_an_llm_keyword_and_engine_args_round_trip():
    # LLM and LLMEngine.from_args take **kwargs that go through EngineArgs.from_kwargs: every field
    # name is accepted; the defaults are EngineArgs' own (no second copy to drift).
    assert list(inspect.signature(LLM.__init__).parameters) == ["self", "model", "kwargs"]
    ea = EngineArgs.from_kwargs(**{f: getattr(EngineArgs(), f) for f in FIELDS})
    assert ea == EngineArgs()
    assert EngineArgs(**ea.to_kwargs()) == ea


def test_unknown_keyword_names_the_closest_field():
    with pytest.raises(TypeError, match="did you mean 'max_num_seqs'"):
        EngineArgs.from_kwargs(max_num_seq=4)
    with pytest.raises(TypeError, match="did you mean 'enable_prefix_caching'"):
        LLM(enable_prefix_cache=False)
    with pytest.raises(TypeError, match="did you mean 'block_size'"):
        LLMEngine.from_args(None, blocksize=8)
    with pytest.raises(TypeError, match="unknown engine setting 'zzz'"):
        EngineArgs.from_kwargs(zzz=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype="float16"), ValueError, "dtype must be one of"),
        (dict(attention_backend="cuda"), ValueError, "attention_backend must be one of"),
        (dict(scheduling_policy="lifo"), ValueError, "scheduling_policy"),
        (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1"),
        (dict(max_num_batched_tokens=1), ValueError, "max_num_batched_tokens must be >= 2"),
        (dict(block_size="16"), TypeError, "block_size must be int"),
        (dict(max_num_seqs=2.5), TypeError, "max_num_seqs must be int"),
        (dict(enable_prefix_caching="yes"), TypeError, "enable_prefix_caching must be bool"),
        (dict(max_num_seqs=True), TypeError, "max_num_seqs must be int"),
        (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization must be in"),
        (dict(seed=None), ValueError, "seed must not be None"),
    ],
)
def test_bad_values_fail_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        EngineArgs(**kwargs)


def test_numbers_are_normalised():
    ea = EngineArgs(kv_cache_memory=2e9, gpu_memory_utilization=1)
    assert ea.kv_cache_memory == 2_000_000_000 and isinstance(ea.kv_cache_memory, int)
    assert ea.gpu_memory_utilization == 1.0


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _subparser("generate").parse_args(["--dtype", "float16"])
    assert "invalid choice" in capsys.readouterr().err


def test_settings_table_lists_every_field():
    table = settings_table()
    for f in FIELDS:
        assert f"`{f}`" in table


def test_readme_settings_table_is_current():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    assert start in readme and end in readme
    body = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert body == settings_table(), "regenerate with: python -m pagedjax.engine_args --write-readme"
