"""`LLM.shutdown` frees the engine's device buffers at once (weights, KV pool, a draft model's)."""

from __future__ import annotations

import jax

from pagedjax import LLM


def test_shutdown_frees_weights_and_pools(model_dir):
    path = model_dir("llama")
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 2}
    llm = LLM(
        path,
        dtype="float32",
        warmup=False,
        compilation_cache_dir="off",
        speculative_config=spec,
        num_kv_pages=16,
    )
    runner = llm.llm_engine.runner
    buffers = [runner.k_cache, runner.draft_model.k_cache, *jax.tree_util.tree_leaves(runner.params)]
    llm.shutdown()
    assert all(b.is_deleted() for b in buffers)
