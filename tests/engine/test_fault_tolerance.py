"""A fault inside an engine step (injected through `ModelRunner.fault_hook`) ends only that step's
requests, with an error; their pages are freed and later requests get the same tokens as on an
engine that never failed — also when the fault took the donated KV pool with it."""

from __future__ import annotations

import pytest

from pagedjax import LLM, EngineStepError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15], [3, 4, 5, 6, 7, 8, 20, 21]]


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(
        model_dir("llama"),
        dtype="float32",
        num_kv_pages=64,
        block_size=4,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        max_model_len=64,
        warmup=False,
    )


def _reference(llm) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


class _FailOnce:
    def __init__(self, at_step: int, lose_pool: bool = False, runner=None):
        self.calls, self.at_step, self.lose_pool, self.runner = 0, at_step, lose_pool, runner
        self.failed_ids: list[str] = []

    def __call__(self, sched_out):
        self.calls += 1
        if self.calls == self.at_step:
            self.failed_ids = [c.request.request_id for c in sched_out.chunks]
            if self.lose_pool:  # what a fault after the pool was donated leaves behind
                self.runner.k_cache.delete()
            raise RuntimeError("injected fault")


@pytest.mark.parametrize("lose_pool", [False, True])
def test_fault_fails_only_that_steps_requests(llm, lose_pool):
    engine = llm.llm_engine
    expected = _reference(llm)
    hook = _FailOnce(at_step=3, lose_pool=lose_pool, runner=engine.runner)
    engine.runner.fault_hook = hook
    try:
        ids = [
            engine.add_request(f"f{lose_pool}{i}", {"prompt_token_ids": p}, GREEDY)
            for i, p in enumerate(PROMPTS)
        ]
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
    finally:
        engine.runner.fault_hook = None
    assert hook.failed_ids, "the fault was not injected"
    failed = {rid for rid in ids if finals[rid].error is not None}
    assert failed == set(hook.failed_ids) and failed != set(ids)
    for rid in failed:
        assert "injected fault" in finals[rid].error
        assert finals[rid].outputs[0].finish_reason == "error"
    for i, rid in enumerate(ids):
        if rid not in failed:  # the others finish with exactly the tokens of a clean run
            assert finals[rid].outputs[0].token_ids == expected[i]
    m = engine.get_metrics()
    assert m["kv_pages_used"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0
    assert m["finished_by_reason"].get("error", 0) >= len(failed)
    engine.scheduler.check_invariants()
    assert _reference(llm) == expected  # and the engine serves on, unchanged


def test_generate_raises_a_typed_error_and_recovers(llm):
    expected = _reference(llm)
    llm.llm_engine.runner.fault_hook = _FailOnce(at_step=1)
    try:
        with pytest.raises(EngineStepError, match="injected fault") as e:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert e.value.request_ids
    finally:
        llm.llm_engine.runner.fault_hook = None
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.get_metrics()["kv_pages_used"] == 0
    assert _reference(llm) == expected
