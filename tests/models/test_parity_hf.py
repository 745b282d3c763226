"""Acceptance 1: logits through the paged cache equal Hugging Face transformers' (float32).

Every variant runs several requests together through the real engine (chunked prefill, decodes and
prefills mixed in one step); each scheduled token's logits are captured and compared with HF's
logits of one full forward pass over the same token sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedjax import SamplingParams
from pagedjax.testing.capture import run_capturing_logits, small_engine

VARIANTS = [
    ("llama", {}),
    ("llama3", {}),
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": True}),
    ("mqa", {}),
    ("tied", {}),
    ("gemma2", {}),
    ("gemma3", {}),
    ("mixtral", {}),
    ("qwen3_moe", {}),
    ("qwen2_moe", {}),
    ("phi3", {}),
]


@pytest.mark.parametrize(
    "variant,overrides", VARIANTS, ids=[v + "".join(f"-{k}" for k in o) for v, o in VARIANTS]
)
def test_logits_match_hf_through_paged_cache(variant, overrides, model_dir, hf_model):
    path = model_dir(variant, **overrides)
    engine = small_engine(path, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (1, 7, 23, 13)]
    run = run_capturing_logits(engine, prompts, max_tokens=6)
    assert run.mixed_steps > 0, "no step mixed decodes with prefill chunks"
    hf = hf_model(path)
    worst = 0.0
    for rid, prompt in zip(run.request_ids, prompts, strict=True):
        seq = prompt + run.outputs[rid]
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].numpy()
        ours = run.logits_array(rid, len(seq) - 1)
        worst = max(worst, float(np.abs(ours - ref[: len(seq) - 1]).max()))
    assert worst <= 1e-4, f"max abs logit difference {worst:.2e}"


def test_sharded_safetensors_load(model_dir, hf_model, tmp_path):
    """A sharded checkpoint (model.safetensors.index.json) loads to the same weights."""
    from pagedjax.models.loader_hf import read_hf_tensors
    from pagedjax.testing.model_factory import make_test_model

    path = make_test_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tensors = read_hf_tensors(path)
    ref = hf_model(model_dir("llama")).state_dict()
    assert set(tensors) == set(ref)
    for name, t in ref.items():
        np.testing.assert_array_equal(tensors[name], t.numpy())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json

    from pagedjax.models.loader import load_model
    from pagedjax.models.registry import UnsupportedArchitectureError

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        load_model(str(tmp_path), "float32")


def test_last_layer_pruning_keeps_sampled_logits_exact(model_dir):
    """The step runs the last layer's output projection and MLP only for rows that need logits
    (models/llama.py `keep_rows`); the logits of those rows must equal the unpruned computation's
    (capture_logits runs every row through every layer and selects afterwards)."""
    prompts = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate((9, 23, 2, 31))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)

    def run(capture: bool):
        # Room for 2 prefill sequences per step: a 16-64 token chunk step samples far fewer rows
        # than it computes, so the last layer is pruned.
        engine = small_engine(model_dir("llama"), max_num_batched_tokens=64, max_num_prefill_seqs=2)
        engine.runner.capture_logits = capture
        ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        assert any(shape.num_tokens > shape.num_sample_rows for shape, _ in engine.runner._executables)
        return [done[i] for i in ids]

    pruned, full = run(capture=False), run(capture=True)
    for a, b in zip(pruned, full, strict=True):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
            assert step_a.keys() == step_b.keys()
            np.testing.assert_allclose(list(step_a.values()), list(step_b.values()), atol=1e-5)


def test_longrope_decode_past_original_length_matches_hf_generate(model_dir, hf_model):
    """Phi-3's LongRoPE switches to the long factors at original_max_position_embeddings (64 here).
    Decoding across it, each token is rotated with the set its position selects, as in HF's
    cached generation; the logits of every step must match HF's step by step."""
    path = model_dir("phi3")
    engine = small_engine(path, dtype="float32")
    prompt = np.random.default_rng(1).integers(3, 500, size=50).tolist()
    run = run_capturing_logits(engine, [prompt], max_tokens=30)  # positions 50..79
    rid = run.request_ids[0]
    seq = prompt + run.outputs[rid]
    hf = hf_model(path)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        ref, cache = [out.logits[0].numpy()], out.past_key_values
        for token in run.outputs[rid][:-1]:
            out = hf(torch.tensor([[token]]), cache=cache, use_cache=True)
            ref.append(out.logits[0].numpy())
            cache = out.past_key_values
    ref = np.concatenate(ref)
    ours = run.logits_array(rid, len(seq) - 1)
    assert np.abs(ours - ref).max() <= 1e-4


ONE_PER_ARCHITECTURE = ["llama", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe", "phi3"]


@pytest.mark.parametrize("variant", ONE_PER_ARCHITECTURE)
def test_logits_match_hf_with_prefix_cache_and_preemption(variant, model_dir, hf_model):
    """Acceptance 1 under memory pressure: prompts share a 12-token prefix (pages reused from the
    prefix cache) and a 20-page pool cannot hold them all (requests preempted and recomputed). Every
    position the engine computed, including recomputed ones, must match HF's logits."""
    path = model_dir(variant)
    engine = small_engine(path, dtype="float32", num_kv_pages=20, enable_prefix_caching=True)
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 500, size=12).tolist()
    prompts = [prefix + rng.integers(3, 500, size=n).tolist() for n in (5, 9, 2, 14)]
    run = run_capturing_logits(engine, prompts, max_tokens=12)
    metrics = engine.get_metrics()
    assert metrics["num_preemptions"] > 0, "the pool was large enough: nothing was preempted"
    assert metrics["prefix_cache_hits"] > 0, "no prompt reused the shared prefix's pages"
    hf = hf_model(path)
    worst = 0.0
    for rid, prompt in zip(run.request_ids, prompts, strict=True):
        seq = prompt + run.outputs[rid]
        got = run.logits[rid]
        # every sampled position was computed (the prefix ones may have come from the cache)
        assert set(range(len(prompt) - 1, len(seq) - 1)) <= set(got)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].numpy()
        worst = max(worst, max(float(np.abs(row - ref[p]).max()) for p, row in got.items()))
    assert worst <= 1e-4, f"max abs logit difference {worst:.2e}"
