"""Acceptance 2: sampling with speculation draws from the target's distribution. Two-sample
chi-square tests (disjoint fixed seeds, so not the per-seed identity) between the engine with and
without n-gram speculation, at each of the first 3 output positions, at temperature 1 and with
top-p 0.9, on a small random model whose LM head is scaled up (peaky distributions, so drafts are
often accepted)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.stats import chi2_contingency

from pagedjax import LLM, SamplingParams

N = 400  # samples per arm
PROMPT = [11, 12, 13, 14, 11, 12, 13, 14, 11, 12, 13]
COMMON = dict(
    dtype="float32",
    block_size=4,
    max_num_seqs=64,
    max_num_batched_tokens=256,
    max_model_len=64,
    num_kv_pages=256,  # small pools: the suite builds many engines in one process
    warmup=False,
    compilation_cache_dir="off",
    enable_prefix_caching=True,
)
# Layer skip drafts for every request (prompt lookup would only where the first sample happens to
# continue the prompt); ~16% of its drafts are accepted on this model at temperature 1.
SPEC = {"method": "layer_skip", "num_draft_layers": 1, "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def peaky_model(model_dir, tmp_path_factory):
    """The small Llama with its LM head scaled up: a few tokens carry most of the mass."""
    src = Path(model_dir("llama"))
    dst = tmp_path_factory.mktemp("peaky")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * 6.0
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    return str(dst)


def positions(llm: LLM, params: SamplingParams, seeds) -> list[Counter]:
    reqs = [params.clone(seed=int(s)) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(seeds), reqs, use_tqdm=False)
    counts = [Counter() for _ in range(3)]
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        assert len(toks) == 3
        for j in range(3):
            counts[j][toks[j]] += 1
    return counts


def chi2_pvalue(a: Counter, b: Counter) -> float:
    """Tokens seen at least 10 times in the pooled samples are their own bins; the rest one bin."""
    pooled = a + b
    keep = [t for t, c in pooled.items() if c >= 10]
    rest = lambda c: sum(v for t, v in c.items() if t not in keep)  # noqa: E731
    table = np.array([[a[t] for t in keep] + [rest(a)], [b[t] for t in keep] + [rest(b)]])
    table = table[:, table.sum(axis=0) > 0]
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_distribution_with_speculation_equals_the_targets(peaky_model, top_p):
    params = SamplingParams(temperature=1.0, top_p=top_p, max_tokens=3, ignore_eos=True)
    plain = LLM(peaky_model, **COMMON)
    spec = LLM(peaky_model, speculative_config=SPEC, **COMMON)
    base = positions(plain, params, np.arange(N))
    spec_counts = positions(spec, params, np.arange(N, 2 * N))  # other seeds: a real two-sample test
    m = spec.get_metrics()
    assert m["spec_num_accepted_tokens"] > N // 20  # speculation really decided many positions
    assert m["spec_num_draft_tokens"] > m["spec_num_accepted_tokens"]  # and rejections happened
    plain.shutdown()
    spec.shutdown()
    for j in range(3):
        assert chi2_pvalue(base[j], spec_counts[j]) > 1e-3, (
            j,
            base[j].most_common(5),
            spec_counts[j].most_common(5),
        )
