"""Pieces of speculative decoding on their own: prompt lookup, verification, config, row buckets."""

from __future__ import annotations

import numpy as np
import pytest

from pagedjax.engine_args import EngineArgs
from pagedjax.runner.buckets import BucketPolicy, StepShape
from pagedjax.spec_decode import SpecDecodeMetrics, SpeculativeConfig
from pagedjax.spec_decode.ngram import ngram_lookup
from pagedjax.spec_decode.verify import verified_tokens


def lookup(tokens, k=3, n_min=1, n_max=3):
    return ngram_lookup(np.asarray(tokens, np.int32), k, n_min, n_max)


def test_ngram_continues_the_latest_earlier_occurrence_of_the_longest_suffix():
    assert lookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]) == [5, 6, 2]  # "2 3" last seen before "5 6"
    assert lookup([7, 1, 2, 3, 8, 8, 0, 2, 3], n_max=3) == [8, 8, 0]  # "2 3": n=3 "0 2 3" has no match
    assert lookup([1, 2, 3, 1, 2]) == [3, 1, 2]  # the continuation may run into the suffix itself
    assert lookup([5, 6, 7, 5], k=2) == [6, 7]  # falls back to n=1


def test_ngram_without_a_match_or_below_min_proposes_nothing():
    assert lookup([1, 2, 3, 4]) == []
    assert lookup([1, 2, 9, 2], n_min=2) == []  # only a 1-gram repeats
    assert lookup([4]) == []
    assert lookup([3, 3], k=4) == [3]  # only as many tokens as follow the match


def test_verified_tokens_keep_the_matching_prefix_and_one_target_token():
    assert verified_tokens([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert verified_tokens([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # second rejected: corrected
    assert verified_tokens([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert verified_tokens([], [4]) == [4]
    with pytest.raises(ValueError):
        verified_tokens([1, 2], [1, 2])


def test_speculative_config_errors_are_clear():
    ok = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (ok.method, ok.num_speculative_tokens, ok.prompt_lookup_min, ok.prompt_lookup_max) == (
        "ngram",
        4,
        2,
        4,
    )
    for bad, match in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "medusa", "num_speculative_tokens": 2}, "must be one of"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "not implemented yet"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "is required by method"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "applies to it only"),
        ({"method": "ngram", "num_speculative_tokens": 0}, ">= 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown keys"),
        ({"method": "layer_skip", "num_speculative_tokens": 2}, "num_draft_layers >= 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "num_draft_layers": 3}, "applies to method"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by_batch_size",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "x": 1})
    args = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert SpeculativeConfig.parse(args.speculative_config).num_speculative_tokens == 2


def test_disable_by_batch_size():
    c = SpeculativeConfig("ngram", 2, disable_by_batch_size=4)
    assert c.active(4) and not c.active(5)
    assert SpeculativeConfig("ngram", 2).active(10_000)


def test_sample_rows_cover_every_draft_but_never_exceed_the_prefill_tokens():
    assert StepShape(8, 16, 4).num_sample_rows == 12  # no speculation: one row per sequence
    assert StepShape(8, 16, 4, spec_tokens=3, spec_seqs=4).num_sample_rows == 8 + 16  # Tq bounds it
    assert StepShape(0, 256, 32, spec_tokens=4, spec_seqs=8).num_sample_rows == 32 + 8 * 4
    assert StepShape(0, 256, 32, spec_tokens=4, spec_seqs=32).num_sample_rows == 160  # Sp * (1 + k)
    policy = BucketPolicy(64, 256, 32, spec_tokens=4, spec_seqs=8)
    assert all((s.spec_tokens, s.spec_seqs) == (4, 8) for s in policy.all_shapes())
    assert policy.shape_for(0, 40).num_sample_rows == 64  # 40 prefill tokens -> bucket 64


def test_metrics_per_position_and_mean_accepted_length():
    m = SpecDecodeMetrics()
    m.on_verified(3, 3)
    m.on_verified(3, 1)
    m.on_verified(2, 0)
    snap = m.snapshot()
    assert snap["spec_num_draft_tokens"] == 8 and snap["spec_num_accepted_tokens"] == 4
    assert snap["spec_acceptance_rate_per_position"] == [2 / 3, 1 / 3, 1 / 2]
    assert snap["spec_mean_accepted_length"] == pytest.approx(1 + 4 / 3)


def test_layer_skip_needs_fewer_draft_layers_than_the_model(model_dir):
    from pagedjax import LLM

    spec = {"method": "layer_skip", "num_draft_layers": 2, "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="must be below the model's 2 layers"):
        LLM(
            model_dir("llama"),
            speculative_config=spec,
            warmup=False,
            compilation_cache_dir="off",
            num_kv_pages=16,
        )


def test_draft_model_with_another_vocabulary_is_refused(model_dir):
    from pagedjax import LLM

    other = model_dir("llama", vocab_size=640)
    spec = {"method": "draft_model", "model": other, "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="another vocabulary"):
        LLM(
            model_dir("llama"),
            speculative_config=spec,
            warmup=False,
            compilation_cache_dir="off",
            num_kv_pages=16,
        )


def test_a_smaller_draft_model_gives_the_targets_greedy_tokens(model_dir):
    """A 1-layer model of the same vocabulary drafts for the 2-layer target."""
    from pagedjax import LLM, SamplingParams

    settings = dict(
        dtype="float32", warmup=False, compilation_cache_dir="off", max_model_len=96, num_kv_pages=64
    )
    target = model_dir("llama")
    spec = {
        "method": "draft_model",
        "model": model_dir("llama", num_hidden_layers=1),
        "num_speculative_tokens": 3,
    }
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8, 5 + i, 6, 7]} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    with_draft = LLM(target, speculative_config=spec, **settings)
    got = [o.outputs[0].token_ids for o in with_draft.generate(prompts, params, use_tqdm=False)]
    plain = LLM(target, **settings)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert with_draft.get_metrics()["spec_num_draft_tokens"] > 0
    with_draft.shutdown()
    plain.shutdown()
