"""orbax checkpoints: save a loaded model, load it back through LLM(path), same greedy outputs."""

from __future__ import annotations

import numpy as np

from pagedjax import LLM, SamplingParams
from pagedjax.models.checkpoint import is_checkpoint, save_checkpoint
from pagedjax.models.layers.linear import unpack_params


def test_orbax_checkpoint_round_trip(model_dir, tmp_path):
    kw = dict(
        dtype="float32",
        num_kv_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        warmup=False,
        compilation_cache_dir="off",
    )
    src = LLM(model_dir("qwen2"), **kw)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), src.llm_engine.model)
    assert is_checkpoint(ckpt)
    restored = LLM(ckpt, **kw)
    # The engine may hold packed weights (matmul_backend "cpu"): compare the logical ones.
    for a, b in zip(
        np.asarray(_qkv(src.llm_engine.model)).ravel()[:1000],
        np.asarray(_qkv(restored.llm_engine.model)).ravel()[:1000],
        strict=True,
    ):
        assert a == b
    prompts = ["hello world", "the cat sat on"]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in src.generate(prompts, sp, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in restored.generate(prompts, sp, use_tqdm=False)]
    assert a == b
    assert restored.llm_engine.model.config == src.llm_engine.model.config


def _qkv(model):
    return unpack_params(model.params, model.config.tie_word_embeddings)["layers"]["qkv_proj"]["kernel"]
