"""The offline model/tokenizer factory: deterministic, loadable by transformers, sane tokenizer."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pagedjax.testing import model_factory as mf  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return mf.train_test_tokenizer()


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {v: mf.make_test_model(root / v, v) for v in mf.VARIANTS}


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id in (None, 0)
    assert tokenizer.pad_token_id is not None
    # Nothing is added implicitly.
    assert tokenizer.encode("hello") == tokenizer.encode("hello", add_special_tokens=True)
    assert 2 not in tokenizer.encode("hello")


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Unicode: naïve café, 日本語, emoji 🙂.",
        "def add(a, b):\n    return a + b\n",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_compresses_english(tokenizer):
    text = "I would like to visit the museums in the city this summer."
    assert len(tokenizer.encode(text)) < len(text.encode()) * 0.6


def test_tokenizer_special_tokens_in_text(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2


def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tokenizer.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nHello!<|im_end|>\n"


def test_tokenizer_deterministic_and_seeded():
    a = mf.train_test_tokenizer(512, seed=0).backend_tokenizer.to_str()
    b = mf.train_test_tokenizer(512, seed=0).backend_tokenizer.to_str()
    c = mf.train_test_tokenizer(512, seed=1).backend_tokenizer.to_str()
    assert a == b
    assert a != c


def test_tokenizer_padded_vocab():
    tok = mf.train_test_tokenizer(32000)
    assert len(tok) == 32000
    assert isinstance(tok.decode([31999, 100, 5]), str)
    text = "Paris is known for its museums."
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text * 5)) < 4000  # filler tokens are never produced by encoding


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = mf.make_test_model(tmp_path / "a", "qwen2", seed=3)
    b = mf.make_test_model(tmp_path / "b", "qwen2", seed=3)
    c = mf.make_test_model(tmp_path / "c", "qwen2", seed=4)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()
    assert read(a, "model.safetensors") == read(b, "model.safetensors")
    assert read(a, "config.json") == read(b, "config.json")
    assert read(a, "tokenizer.json") == read(b, "tokenizer.json")
    assert read(a, "model.safetensors") != read(c, "model.safetensors")


@pytest.mark.parametrize("variant", sorted(mf.VARIANTS))
def test_variant_loads_with_transformers(variant_dirs, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = variant_dirs[variant]
    arch = mf.VARIANTS[variant][0]
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == [arch]
    assert cfg["eos_token_id"] == 2 and cfg["bos_token_id"] == 0
    layers = mf.VARIANTS[variant][1].get("num_hidden_layers", 2)
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == layers and cfg["head_dim"] == 16

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == arch
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 512
    ids = torch.tensor([tok.encode("The capital of France is Paris. " * 8)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.3  # clear margins for greedy parity tests

    sd = model.state_dict()
    norms = [v for k, v in sd.items() if "norm" in k]
    assert norms and all(not torch.allclose(n, torch.ones_like(n)) for n in norms)
    centre = 0.0 if variant.startswith("gemma") else 1.0  # Gemma scales by (1 + weight)
    assert all(abs(float(n.mean()) - centre) < 0.2 for n in norms)
    biases = [v for k, v in sd.items() if k.endswith("bias")]
    if variant in ("qwen2", "qwen2_moe"):
        assert len(biases) == 3 * 2 and all(float(b.abs().mean()) > 0.01 for b in biases)
    else:
        assert not biases


def test_variant_specifics(variant_dirs):
    cfg = lambda v: json.load(open(os.path.join(variant_dirs[v], "config.json")))
    assert cfg("llama")["num_key_value_heads"] == 2
    assert cfg("mqa")["num_key_value_heads"] == 1
    assert cfg("tied")["tie_word_embeddings"] is True
    assert cfg("llama")["tie_word_embeddings"] is False
    rope = cfg("llama3")["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 64
    assert not cfg("mistral").get("sliding_window")

    from safetensors import safe_open

    with safe_open(os.path.join(variant_dirs["tied"], "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_llama3_scaling_changes_logits(variant_dirs):
    from transformers import AutoModelForCausalLM

    # Same seed and parameter names: llama and llama3 hold identical weights, differ only in RoPE.
    a = AutoModelForCausalLM.from_pretrained(variant_dirs["llama"])
    b = AutoModelForCausalLM.from_pretrained(variant_dirs["llama3"])
    ids = torch.arange(3, 3 + 100).remainder(500).unsqueeze(0)
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().amax(-1)[0]
    assert float(diff[0]) < 1e-5  # position 0: no rotation either way
    assert float(diff[50:].mean()) > 0.05


def test_sharded_and_bf16(tmp_path, variant_dirs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = mf.make_test_model(tmp_path / "sharded", "llama", max_shard_size="100KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    ref = load_file(os.path.join(variant_dirs["llama"], "model.safetensors"))
    got = {}
    for s in shards:
        got.update(load_file(os.path.join(path, s)))
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)

    bf = mf.make_test_model(tmp_path / "bf16", "llama", dtype="bfloat16", num_hidden_layers=3)
    t = load_file(os.path.join(bf, "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert "model.layers.2.mlp.down_proj.weight" in t
    model = AutoModelForCausalLM.from_pretrained(bf)
    assert model.config.num_hidden_layers == 3


def test_benchmark_model_cache(tmp_path, monkeypatch):
    small = dict(mf.BENCHMARK_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    small.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=600)
    monkeypatch.setattr(mf, "BENCHMARK_CONFIG", small)
    path = mf.make_benchmark_model(tmp_path / "bench")
    st = os.path.join(path, "model.safetensors")
    mtime = os.stat(st).st_mtime_ns
    assert mf.make_benchmark_model(tmp_path / "bench") == path
    assert os.stat(st).st_mtime_ns == mtime  # reused, not rebuilt
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["vocab_size"] == 600 and cfg["architectures"] == ["LlamaForCausalLM"]

    monkeypatch.setattr(mf, "BENCHMARK_CONFIG", dict(small, num_hidden_layers=2))
    mf.make_benchmark_model(tmp_path / "bench")
    assert json.load(open(os.path.join(path, "config.json")))["num_hidden_layers"] == 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_benchmark_config_shape():
    c = mf.BENCHMARK_CONFIG
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]) == (12, 768, 12)
    assert (c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"]) == (4, 2048, 32000)
    assert c["tie_word_embeddings"] is False and c["max_position_embeddings"] == 2048
    h, f, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    n = 2 * v * h + layers * (h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h) + h
    assert 120e6 < n < 130e6
