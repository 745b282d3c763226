"""Run greedy requests through a real engine and keep every scheduled token's logits (by position),
for comparing against a reference implementation (tests, notebooks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedjax.engine.llm_engine import LLMEngine
from pagedjax.sampling_params import SamplingParams


@dataclass
class CapturedRun:
    request_ids: list[str]
    logits: dict[str, dict[int, np.ndarray]]  # request id -> position -> f32[V]
    outputs: dict[str, list[int]]  # request id -> generated token ids
    mixed_steps: int  # steps that had both decode rows and prefill chunks

    def logits_array(self, request_id: str, num_positions: int) -> np.ndarray:
        got = self.logits[request_id]
        assert sorted(got) == list(range(num_positions)), "every position's logits captured exactly once"
        return np.stack([got[p] for p in range(num_positions)])


def small_engine(path: str, dtype: str = "float32", **overrides) -> LLMEngine:
    """An engine with tiny pages, pool and token budget, so that a few short prompts already
    exercise chunked prefill and steps that mix decodes with prefill chunks."""
    kwargs = dict(
        dtype=dtype,
        block_size=4,
        num_kv_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        warmup=False,
        compilation_cache_dir="off",
    )
    return LLMEngine.from_args(path, **{**kwargs, **overrides})


def run_capturing_logits(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> CapturedRun:
    engine.runner.capture_logits = True
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
    run = CapturedRun(ids, {i: {} for i in ids}, {}, 0)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    run.outputs[out.request_id] = out.outputs[0].token_ids
            kinds = set()
            for rid, (start, rows) in engine.last_step_result.logits.items():
                kinds.add(len(rows) > 1)
                for k, row in enumerate(rows):
                    run.logits[rid][start + k] = row
            run.mixed_steps += kinds == {True, False}
    finally:
        engine.runner.capture_logits = False
    return run
