"""Acceptance 2: continuous batching with chunked prefill and preemption gives the same tokens as
Hugging Face `generate` run one prompt at a time; plus abort, rejection, n, stop conditions, logprobs.

All tests share one small engine (a 2-layer random Llama, float32) whose KV pool is far too small for
the whole batch, so requests are preempted and recomputed, and whose token budget is smaller than the
longest prompts, so prefills are chunked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedjax import LLM, InvalidRequestError, SamplingParams

BLOCK_SIZE = 4
NUM_PAGES = 32  # 128 token slots for up to 8 sequences of up to 84 tokens: preemption is certain
MAX_NUM_SEQS = 8
MAX_BATCHED_TOKENS = 32  # < the longest prompts: chunked prefill
MAX_MODEL_LEN = 128
TIE_EPS = 1e-5  # a greedy token may differ from HF's only where HF's top-2 logits are this close


def _prompts(n: int = 36, seed: int = 1234) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 61, size=n)
    lengths[:2] = (1, 60)
    prompts = [rng.integers(3, 512, size=int(k)).tolist() for k in lengths]
    max_tokens = rng.integers(1, 25, size=n).tolist()
    max_tokens[:2] = (24, 24)
    return prompts, max_tokens


PROMPTS, MAX_TOKENS = _prompts()


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(
        path,
        dtype="float32",
        block_size=BLOCK_SIZE,
        num_kv_pages=NUM_PAGES,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_num_prefill_seqs=4,
        max_model_len=MAX_MODEL_LEN,
        warmup=False,
        compilation_cache_dir="off",
        seed=0,
    )


@pytest.fixture(scope="module")
def hf(path, hf_model):
    return hf_model(path)


def hf_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """HF greedy continuation of exactly n tokens and the raw logits of each step.

    eos_token_id=None: the engine runs with ignore_eos, so HF must neither stop at EOS nor (through
    min_new_tokens) suppress it."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, len(prompt) :].tolist()
    assert len(ids) == n
    return ids, [step[0].float().numpy() for step in out.logits]


def assert_greedy_matches(ours: list[int], ref: list[int], ref_logits: list[np.ndarray], what: str) -> str:
    """Equal token by token, except that after a genuine tie in HF's logits (top-2 within TIE_EPS,
    and our token one of the tied ones) the rest of the sequence is not compared."""
    assert len(ours) == len(ref), f"{what}: {len(ours)} tokens, HF {len(ref)}"
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a == b:
            continue
        lg = ref_logits[k]
        top2 = np.sort(lg)[-2:]
        gap = float(top2[1] - top2[0])
        assert gap < TIE_EPS and lg[a] >= lg.max() - TIE_EPS, (
            f"{what}: token {k} is {a}, HF has {b}; HF top-2 logit gap {gap:.2e} is no tie "
            f"(HF logit of ours {lg[a]:.6f}, max {lg.max():.6f})"
        )
        return f"tie at {k}"
    return "equal"


def test_tie_check_accepts_only_genuine_ties():
    tied = np.zeros(8, np.float32)
    tied[[3, 5]] = 4.0, 4.0 - 1e-6
    clear = np.zeros(8, np.float32)
    clear[[3, 5]] = 4.0, 3.9
    assert assert_greedy_matches([1, 3, 2], [1, 3, 2], [clear] * 3, "x") == "equal"
    assert assert_greedy_matches([1, 5, 7], [1, 3, 2], [clear, tied, clear], "x") == "tie at 1"
    with pytest.raises(AssertionError, match="no tie"):
        assert_greedy_matches([1, 5, 2], [1, 3, 2], [clear] * 3, "x")
    with pytest.raises(AssertionError, match="no tie"):  # a tie between two tokens that are not ours
        assert_greedy_matches([1, 0, 2], [1, 3, 2], [clear, tied, clear], "x")


def hf_log_softmax(hf, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), dim=-1).numpy()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids_prompt(p: list[int]) -> dict:
    return {"prompt_token_ids": p}


# ------------------------------------------------------------------------------------------------


def test_batch_with_preemption_and_chunked_prefill_matches_hf(llm, hf):
    assert max(len(p) for p in PROMPTS) > MAX_BATCHED_TOKENS and len(PROMPTS) >= 32
    before = llm.get_metrics()["num_preemptions"]
    outs = llm.generate([ids_prompt(p) for p in PROMPTS], [greedy(n) for n in MAX_TOKENS], use_tqdm=False)
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > before, "the tiny KV pool should have forced preemption"
    assert metrics["kv_pages_used"] == 0, "pages still in use after every request finished"
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.scheduler.check_invariants()

    verdicts = []
    for i, (prompt, n, out) in enumerate(zip(PROMPTS, MAX_TOKENS, outs, strict=True)):
        assert out.finished and out.prompt_token_ids == prompt
        comp = out.outputs[0]
        assert comp.finish_reason == "length" and len(comp.token_ids) == n
        ref, ref_logits = hf_greedy(hf, prompt, n)
        verdicts.append(
            assert_greedy_matches(comp.token_ids, ref, ref_logits, f"prompt {i} (len {len(prompt)})")
        )
    n_equal, n_preempt = verdicts.count("equal"), metrics["num_preemptions"] - before
    print(f"{n_preempt} preemptions; {n_equal}/{len(verdicts)} equal to HF")
    # Random-weight models have clear logit margins: ties must be rare, not a loophole.
    assert verdicts.count("equal") >= len(PROMPTS) - 2, verdicts
    assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_abort_mid_run_frees_pages_and_others_are_unaffected(llm):
    engine = llm.llm_engine
    prompts, params = PROMPTS[:6], greedy(10)
    baseline = [
        o.outputs[0].token_ids for o in llm.generate([ids_prompt(p) for p in prompts], params, use_tqdm=False)
    ]

    ids = [engine.add_request(f"abort-{i}", ids_prompt(p), params) for i, p in enumerate(prompts)]
    target = ids[1]
    finished: dict[str, list[int]] = {}
    for _ in range(100):  # run until the target is mid-generation, holding pages
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        req = engine.scheduler.requests.get(target)
        if req is not None and req.num_output_tokens >= 2 and target in engine.kv_cache.block_tables:
            break
    else:
        pytest.fail("target request never got going")
    held = len(engine.kv_cache.block_tables[target])
    used = engine.kv_cache.stats().pages_used
    engine.abort_request(target)
    # Freed within the call, not at the next step.
    assert target not in engine.kv_cache.block_tables
    assert engine.kv_cache.stats().pages_used == used - held
    assert target not in engine.scheduler.requests
    engine.scheduler.check_invariants()
    engine.abort_request(target)  # aborting twice (or an unknown id) is a no-op
    engine.abort_request("no-such-request")

    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != target, "an aborted request produced output"
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert target not in finished
    for rid, base in zip(ids, baseline, strict=True):
        if rid != target:
            assert finished[rid] == base, rid
    assert engine.get_metrics()["kv_pages_used"] == 0


def test_overlong_request_is_rejected_and_nothing_is_lost(llm):
    engine = llm.llm_engine
    ok = PROMPTS[2]
    expected = llm.generate(ids_prompt(ok), greedy(5), use_tqdm=False)[0].outputs[0].token_ids
    too_long = list(range(3, 3 + MAX_MODEL_LEN - 10))

    # LLM.generate validates every prompt before running any of them.
    with pytest.raises(ValueError) as e:
        llm.generate([ids_prompt(ok), ids_prompt(too_long)], greedy(20), use_tqdm=False)
    assert isinstance(e.value, InvalidRequestError) and "max_model_len" in str(e.value)
    assert not engine.has_unfinished_requests() and engine.get_metrics()["kv_pages_used"] == 0
    with pytest.raises(InvalidRequestError):  # max_tokens=None: fills the context, leaves no room
        llm.generate(
            ids_prompt(list(range(3, 3 + MAX_MODEL_LEN))), SamplingParams(max_tokens=None), use_tqdm=False
        )

    # A request in flight survives another request's rejection.
    rid = engine.add_request("in-flight", ids_prompt(ok), greedy(5))
    engine.step()
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", ids_prompt(too_long), greedy(20))
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad-token", ids_prompt([3, 4, 10_000]), greedy(2))
    with pytest.raises(InvalidRequestError):
        engine.add_request(rid, ids_prompt(ok), greedy(2))  # duplicate id
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out
    assert result is not None and result.request_id == rid and result.outputs[0].token_ids == expected

    again = llm.generate(ids_prompt(ok), greedy(5), use_tqdm=False)
    assert again[0].outputs[0].token_ids == expected
    assert engine.get_metrics()["kv_pages_used"] == 0


def test_n2_with_seed_returns_two_reproducible_outputs(llm):
    sp = SamplingParams(n=2, seed=1234, temperature=1.0, max_tokens=8, ignore_eos=True)
    (a,) = llm.generate(ids_prompt(PROMPTS[3]), sp, use_tqdm=False)
    (b,) = llm.generate(ids_prompt(PROMPTS[3]), sp, use_tqdm=False)
    assert len(a.outputs) == 2 and [c.index for c in a.outputs] == [0, 1]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in a.outputs)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], "seeded sampling must repeat"
    assert llm.get_metrics()["kv_pages_used"] == 0


def test_stop_token_ids_stop_strings_and_length(llm):
    prompt = PROMPTS[4]
    (full,) = llm.generate(ids_prompt(prompt), greedy(20), use_tqdm=False)
    full_ids, full_text = full.outputs[0].token_ids, full.outputs[0].text
    assert full.outputs[0].finish_reason == "length" and len(full_ids) == 20
    assert full.outputs[0].stop_reason is None

    # stop_token_ids: ends at the first occurrence of the token, which is kept in token_ids.
    stop_tok = full_ids[5]
    k = full_ids.index(stop_tok)
    (out,) = llm.generate(ids_prompt(prompt), greedy(20, stop_token_ids=[stop_tok]), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_tok
    assert comp.token_ids == full_ids[: k + 1]

    # stop string: a substring first occurring mid-text; the text ends just before it.
    j = next(
        j
        for j in range(2, len(full_text) - 1)
        if full_text.find(full_text[j : j + 2]) == j and "\ufffd" not in full_text[j : j + 2]
    )
    stop = full_text[j : j + 2]
    (out,) = llm.generate(ids_prompt(prompt), greedy(20, stop=[stop, "never-generated-xyz"]), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full_text[:j]
    assert comp.token_ids == full_ids[: len(comp.token_ids)] and len(comp.token_ids) < 20

    # max_tokens
    (out,) = llm.generate(ids_prompt(prompt), greedy(3), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == full_ids[:3]
    assert llm.get_metrics()["kv_pages_used"] == 0


def test_prompt_logprobs_match_hf(llm, hf):
    prompt = PROMPTS[1]  # 60 tokens: prefilled in two chunks
    assert len(prompt) > MAX_BATCHED_TOKENS
    (out,) = llm.generate(ids_prompt(prompt), greedy(2, prompt_logprobs=2), use_tqdm=False)
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    ref = hf_log_softmax(hf, prompt)
    worst = 0.0
    for i in range(1, len(prompt)):
        entry = plp[i]
        assert prompt[i] in entry and 2 <= len(entry) <= 3, (i, entry)
        for tok, lp in entry.items():
            worst = max(worst, abs(lp - ref[i - 1, tok]))
        top = sorted(entry.values(), reverse=True)[0]
        assert abs(top - ref[i - 1].max()) < 1e-4, f"position {i}: the top-1 entry is not HF's top-1"
    assert worst < 1e-4, f"prompt logprobs differ from HF log_softmax by {worst:.2e}"


def test_logprobs_include_sampled_token(llm, hf):
    prompt = PROMPTS[5]
    (out,) = llm.generate(ids_prompt(prompt), greedy(6, logprobs=3), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids) == 6
    ref = hf_log_softmax(hf, prompt + comp.token_ids)
    for k, (tok, lps) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        assert len(lps) >= 3 and tok in lps
        assert lps[tok] == max(lps.values()), "greedy token must have the top logprob"
        for t, lp in lps.items():
            assert abs(lp - ref[len(prompt) - 1 + k, t]) < 1e-4
    assert comp.cumulative_logprob == pytest.approx(
        sum(d[t] for d, t in zip(comp.logprobs, comp.token_ids, strict=True))
    )

    # Sampling: the sampled token is included even when it is not in the top 3.
    sp = SamplingParams(temperature=1.5, seed=7, max_tokens=12, logprobs=3, ignore_eos=True)
    (out,) = llm.generate(ids_prompt(prompt), sp, use_tqdm=False)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 12
    for tok, lps in zip(comp.token_ids, comp.logprobs, strict=True):
        assert len(lps) >= 3 and tok in lps and all(v <= 0.0 for v in lps.values())


def test_out_of_vocab_ids_in_sampling_params(llm):
    """The batched sampler packs ids into int32: out-of-vocab logit_bias keys are an error, while
    top_k >= vocab (= all tokens) and unsampleable stop ids change nothing; other requests go on."""
    base = SamplingParams(temperature=0.7, seed=1, max_tokens=4)
    ref = llm.generate([[5, 6, 7]], base, use_tqdm=False)[0].outputs[0].token_ids
    wide = base.clone(top_k=2**40, stop_token_ids=[2**40], min_tokens=2)
    assert llm.generate([[5, 6, 7]], wide, use_tqdm=False)[0].outputs[0].token_ids == ref
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        llm.generate([[5, 6, 7]], SamplingParams(logit_bias={2**40: 1.0}), use_tqdm=False)
    assert llm.generate([[5, 6, 7]], base, use_tqdm=False)[0].outputs[0].token_ids == ref


def test_step_final_only_returns_just_the_finished_requests(llm):
    """`step(final_only=True)` (what LLM.generate uses) skips the cumulative outputs of running
    requests but returns every finished one exactly once, equal to the default stepping's."""
    engine = llm.llm_engine
    prompts = PROMPTS[:5]

    def run(final_only: bool) -> tuple[dict[str, tuple], int]:
        ids = [
            engine.add_request(f"fo-{final_only}-{i}", ids_prompt(p), greedy(3 + 2 * i))
            for i, p in enumerate(prompts)
        ]
        done: dict[str, tuple] = {}
        unfinished_seen = 0
        while engine.has_unfinished_requests():
            for out in engine.step(final_only=final_only):
                if not out.finished:
                    unfinished_seen += 1
                    continue
                assert out.request_id not in done
                done[out.request_id] = (
                    out.outputs[0].token_ids,
                    out.outputs[0].text,
                    out.outputs[0].finish_reason,
                )
        assert sorted(done) == sorted(ids)
        return {k.split("-", 2)[2]: v for k, v in done.items()}, unfinished_seen

    final, unfinished_final = run(True)
    every, unfinished_every = run(False)
    assert unfinished_final == 0 and unfinished_every > 0
    assert final == every


def test_request_token_at_matches_the_joined_list():
    from pagedjax.core.request import Request

    req = Request("r", [5, 6, 7], SamplingParams(max_tokens=4), seed=0, max_tokens=4)
    req.output_token_ids += [8, 9]
    joined = req.token_ids_slice(0, req.num_tokens)
    assert joined == [5, 6, 7, 8, 9]
    assert [req.token_at(i) for i in range(req.num_tokens)] == joined
