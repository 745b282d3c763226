"""Seeded, deterministic test models and tokenizers built offline (no model hub).

The tests and benchmarks need real Hugging Face checkpoints (``config.json`` + safetensors +
tokenizer files) of several Llama-family architectures, but this machine cannot download any. This
module builds them from scratch:

* :func:`train_test_tokenizer` trains a small byte-level BPE tokenizer (ChatML special tokens, a
  ChatML ``chat_template``) on an English corpus embedded in this module.
* :func:`make_test_model` writes a tiny randomly initialised model of one of :data:`VARIANTS`
  (Llama with GQA, Llama 3 RoPE scaling, Mistral, Qwen2 with q/k/v biases, MQA, tied embeddings).
* :func:`make_benchmark_model` writes the ~125M-parameter Llama-shaped model used by the throughput
  benchmarks (the same shape the peer measurements in ``notes/peers.md`` used), with a build cache.

Everything is a pure function of ``(variant, seed, dtype, overrides)``: the same arguments give
byte-identical safetensors files.

Initialisation is deliberately *not* the usual ``std=0.02``: linear weights are drawn with
``std = 1/sqrt(fan_in)`` and embeddings with ``std = 1``, so activations stay O(1), attention
patterns are far from uniform and the logits have clear margins (greedy parity between engines is
then robust to float32 rounding). RMSNorm weights are ``1 + 0.1 * N(0, 1)`` and biases
``0.1 * N(0, 1)``, so an implementation that drops a norm weight or a bias gives visibly different
logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARK_CONFIG",
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "VARIANTS",
    "corpus_text",
    "make_benchmark_model",
    "make_test_model",
    "train_test_tokenizer",
]

# Bump when the construction changes in a way that changes the produced files (invalidates caches).
FACTORY_VERSION = 1
_MARKER = "pagedjax_factory.json"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 0

# ChatML, as SmolLM2/Qwen2 use it (no default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------

_BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model reads one token at a time and \
guesses the next one. When the guess is good, the text it writes looks like the text it has seen.

Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker. Every \
morning he opened the shutters of his shop, wound the clocks on the wall and waited for the first \
customer of the day. Children came to watch the little brass wheels turn, and he told them stories \
about the mountains, the rivers and the cities far away.

The capital of France is Paris. The capital of Italy is Rome, and the capital of Japan is Tokyo. \
Paris is known for its museums, its bridges over the Seine and its cafes. Rome has ancient ruins, \
fountains and churches. Tokyo is one of the largest cities in the world.

Question: What is two plus two? Answer: Two plus two is four. Question: How many days are there \
in a week? Answer: There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, \
Saturday and Sunday. Question: What is the boiling point of water? Answer: At sea level, water \
boils at 100 degrees Celsius, or 212 degrees Fahrenheit.

To make a cup of tea, boil some fresh water, warm the pot, add one spoon of tea for each person \
and pour the water over the leaves. Let it steam for three to five minutes, then serve it with \
milk, lemon or honey. Some people prefer coffee in the morning and tea in the afternoon.

Computers store numbers in binary. A byte has eight bits and can hold 256 different values. Memory \
is organised in pages, and an operating system maps virtual pages to physical frames so that each \
program believes it owns a large, contiguous address space. The same idea helps a server keep the \
attention cache of many requests in fixed-size blocks instead of one long buffer per request.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

The weather today is sunny with a light breeze from the west. Tomorrow there may be clouds and \
some rain in the evening. In winter the days are short and the nights are long; in summer the sun \
rises early and sets late. Spring brings flowers, and autumn paints the leaves red and gold.

She opened the letter slowly. "Dear friend," it began, "I hope this finds you well. The garden is \
full of roses this year, and the apple trees are heavy with fruit. Please come and visit us soon, \
and bring your sister if she is free." She smiled, folded the letter and put it in her pocket.

Good morning! How can I help you today? I would like to book a table for two people at seven \
o'clock, please. Certainly. May I have your name? Thank you very much, have a nice evening. You \
are welcome, and see you soon.

Mathematics is the language of patterns. The sum of the angles of a triangle is 180 degrees. A \
prime number has exactly two divisors: one and itself. The first primes are 2, 3, 5, 7, 11, 13, \
17, 19, 23 and 29. The number pi is about 3.14159, and the square root of two is about 1.41421.

Scientists observe the world, ask questions, form hypotheses and test them with experiments. When \
the results agree with the prediction, the hypothesis gains support; when they do not, it must be \
changed or abandoned. Good experiments are careful, repeatable and honest about their errors.

The train left the station at noon and travelled north through green fields, small towns and long \
tunnels under the hills. Passengers read books, looked out of the windows or slept. At the last \
stop, a man with a red umbrella stepped onto the platform and walked towards the old harbour.

Water, air, earth and fire were once thought to be the four elements. Today we know more than one \
hundred chemical elements, from hydrogen and helium to iron, gold and uranium. Each element has a \
number of protons in its nucleus, and atoms join together to form molecules.

Please summarize the following paragraph in one sentence. Write a short poem about the sea. \
Translate this sentence into English. Explain the difference between a list and a tuple. Give me \
three ideas for a birthday party. What are the main causes of climate change?
"""

_WORDS = {
    "subject": [
        "the teacher",
        "a young student",
        "my neighbour",
        "the old captain",
        "our team",
        "the engineer",
        "a curious child",
        "the doctor",
        "the small robot",
        "every farmer",
    ],
    "verb": [
        "writes",
        "reads",
        "builds",
        "finds",
        "paints",
        "explains",
        "repairs",
        "carries",
        "remembers",
        "describes",
    ],
    "object": [
        "a long letter",
        "the red book",
        "a wooden boat",
        "the broken clock",
        "a simple program",
        "the map of the city",
        "an old song",
        "the garden gate",
        "a new bridge",
        "the secret recipe",
    ],
    "place": [
        "in the morning",
        "at the library",
        "near the river",
        "after dinner",
        "on the mountain",
        "during the storm",
        "in the kitchen",
        "before school",
        "at the market",
        "under the stars",
    ],
}


def corpus_text(seed: int = 0, num_generated: int = 40) -> str:
    """The tokenizer's training text: the built-in paragraphs plus ``num_generated`` seeded sentences."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_generated):
        s = " ".join(rng.choice(_WORDS[k]) for k in ("subject", "verb", "object", "place"))
        sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"]))
    return _BASE_CORPUS + "\n" + " ".join(sentences) + "\n"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _build_tokenizer_object(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_special = len(SPECIAL_TOKENS)
    base = 256 + n_special
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} (256 bytes + {n_special} special tokens)")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text(seed)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)

    # The corpus is small: for large vocabularies pad with unreachable (never produced by encoding,
    # but decodable) tokens so that len(tokenizer) == vocab_size exactly.
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    n_total = len(vocab) + sum(1 for t in data["added_tokens"] if t["content"] not in vocab)
    if n_total < vocab_size:
        next_id = max(max(vocab.values()), max(t["id"] for t in data["added_tokens"])) + 1
        i = 0
        while next_id < vocab_size:
            name = f"<|filler_{i}|>"
            i += 1
            if name in vocab:
                continue
            vocab[name] = next_id
            next_id += 1
        tok = Tokenizer.from_str(json.dumps(data))
    return tok


def train_test_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer on the built-in corpus; returns a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` = 0 (bos and pad), ``<|im_start|>`` = 1, ``<|im_end|>`` = 2 (eos); a ChatML
    ``chat_template``; no token is added automatically by ``encode``. ``len(tokenizer) == vocab_size``
    (padded with never-produced ``<|filler_i|>`` tokens when the corpus has too few merges).
    Deterministic for a given ``(vocab_size, seed)``.
    """
    from transformers import PreTrainedTokenizerFast

    tok = _build_tokenizer_object(vocab_size, seed)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0],
        unk_token=None,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    hf.chat_template = CHATML_TEMPLATE
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2]
    return hf


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_SMALL: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

# variant -> (architecture class name, config overrides on top of _SMALL)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3": (
        "LlamaForCausalLM",
        {
            # rope_theta stays 10000 so that, with head_dim 16, most frequency bands have wavelengths
            # above 16 positions and the llama3 smoothing/scaling changes logits at test lengths.
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": None}),
    "qwen3": ("Qwen3ForCausalLM", {"use_sliding_window": False, "sliding_window": None}),
    "mqa": ("LlamaForCausalLM", {"num_key_value_heads": 1}),
    "tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    # Gemma: small soft caps (so tanh bends at these logit sizes), a window shorter than the test
    # sequences, query_pre_attn_scalar != head_dim, 4 layers (sliding/global twice: a scanned
    # period of 2 plus the unrolled pruned last layer).
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "num_hidden_layers": 4,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 2.0,
            "tie_word_embeddings": True,
        },
    ),
    # Gemma 3: q/k norms, its own RoPE base on sliding layers and linear scaling on global ones;
    # a layer pattern of period 3 over 4 layers.
    "gemma3": (
        "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        },
    ),
    # MoE: 8 experts, top 2 (Mixtral renormalises; Qwen3-MoE with norm_topk_prob False does not).
    "mixtral": (
        "MixtralForCausalLM",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "use_sliding_window": False,
            "sliding_window": None,
        },
    ),
    # Qwen2-MoE: QKV bias, renormalised top 2 of 8, and a shared expert behind a sigmoid gate.
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": True,
            "use_sliding_window": False,
            "sliding_window": None,
        },
    ),
    # Phi-3: fused qkv/gate_up; LongRoPE with an attention factor (max 512 / original 64) and 3/4
    # partial rotary. Sequences stay below 64 in the parity test (the short factors); the long ones
    # are checked by tests/models/test_rope.py and the decode-past-64 test.
    "phi3": (
        "Phi3ForCausalLM",
        {
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 64,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            },
        },
    ),
}

BENCHMARK_CONFIG: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

_CONFIG_CLASSES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Gemma2ForCausalLM": "Gemma2Config",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
    "MixtralForCausalLM": "MixtralConfig",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
    "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    "Phi3ForCausalLM": "Phi3Config",
}


def _make_config(architecture: str, params: dict[str, Any]):
    import transformers

    params = dict(params)
    rope_theta = params.pop("rope_theta", 10000.0)
    rope_scaling = params.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is not None:
        rope = {**rope_scaling, "rope_theta": float(rope_theta)}
    rope = params.pop("rope_parameters", None) or rope  # transformers-5 spelling wins when given
    cfg_cls = getattr(transformers, _CONFIG_CLASSES[architecture])
    eos = params.pop("eos_token_id", EOS_TOKEN_ID)
    cfg = cfg_cls(
        rope_parameters=rope,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=eos,
        pad_token_id=PAD_TOKEN_ID,
        architectures=[architecture],
        **params,
    )
    return cfg


def _reinit_(model, seed: int) -> None:
    """Deterministically overwrite every parameter (in sorted-name order, one torch.Generator)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # Gemma's RMSNorm scales by (1 + weight): centre its weights on 0 so the scale is ~1 as elsewhere.
    norm_centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    params = dict(model.named_parameters())  # tied weights appear once
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                val = 0.1 * noise
            elif "norm" in name:
                val = norm_centre + 0.1 * noise
            elif "embed_tokens" in name:
                # Tied: the embedding is also the lm_head; 1/sqrt(H) keeps logits O(1) (std 1 would
                # make every step repeat the current token).
                val = noise / (p.shape[1] ** 0.5) if tied else noise
            elif p.dim() >= 2:  # [out, in] projections and [experts, out, in] expert stacks
                val = noise / (p.shape[-1] ** 0.5)
            else:
                val = 0.02 * noise
            p.copy_(val.to(p.dtype))


@contextlib.contextmanager
def _quiet_transformers():
    """No tqdm bars from transformers while saving (restores the previous setting)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_model(
    path: Path,
    architecture: str,
    params: dict[str, Any],
    seed: int,
    dtype: str,
    max_shard_size,
    tokenizer_vocab: int | None,
) -> None:
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cfg = _make_config(architecture, params)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, architecture)
    model = model_cls(cfg)
    model.eval()
    _reinit_(model, seed)
    model = model.to(torch_dtype)
    model.config.dtype = dtype
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with _quiet_transformers():
        model.save_pretrained(str(path), safe_serialization=True, **kwargs)

    tok = train_test_tokenizer(tokenizer_vocab or cfg.vocab_size, seed=0)
    tok.save_pretrained(str(path))
    del model


def _resolve_params(variant: str, config_overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    arch, over = VARIANTS[variant]
    params = {**_SMALL, **over, **config_overrides}
    arch = params.pop("architecture", arch)
    return arch, params


def make_test_model(
    path: str | os.PathLike,
    variant: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    **config_overrides: Any,
) -> str:
    """Write a small random model of ``variant`` (see :data:`VARIANTS`) with its tokenizer to ``path``.

    ``config_overrides`` are transformers config fields (``num_hidden_layers=3``, ``rope_theta=...``,
    ``rope_scaling={...}``...), applied over the variant's defaults. ``max_shard_size`` (e.g.
    ``"100KB"``) produces sharded safetensors with ``model.safetensors.index.json``. The tokenizer is
    the seed-0 :func:`train_test_tokenizer` with ``vocab_size`` tokens. Returns ``str(path)``.
    """
    arch, params = _resolve_params(variant, config_overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_model(path, arch, params, seed, dtype, max_shard_size, None)
    return str(path)


def _marker(arch: str, params: dict[str, Any], seed: int, dtype: str) -> dict[str, Any]:
    return {
        "factory_version": FACTORY_VERSION,
        "architecture": arch,
        "config": json.loads(json.dumps(params, sort_keys=True)),
        "seed": seed,
        "dtype": dtype,
    }


def _is_complete(path: Path, marker: dict[str, Any]) -> bool:
    try:
        if json.loads((path / _MARKER).read_text()) != marker:
            return False
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            return False
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            return all((path / s).is_file() for s in shards)
        return (path / "model.safetensors").is_file()
    except (OSError, ValueError, KeyError):
        return False


def make_benchmark_model(path: str | os.PathLike, seed: int = 0, dtype: str = "float32") -> str:
    """The ~125M random Llama of the benchmarks (12 layers, hidden 768, 12 q / 4 kv heads, FFN 2048,
    vocab 32000, untied, 2048 positions) at ``path``; reused if ``path`` already holds the same build.

    The tokenizer is the built-in BPE padded to 32000 tokens (benchmarks feed token ids directly).
    The folder is written to a temporary sibling and renamed, so an interrupted build is not reused.
    """
    path = Path(path).expanduser()
    arch = "LlamaForCausalLM"
    params = dict(BENCHMARK_CONFIG)
    marker = _marker(arch, params, seed, dtype)
    if _is_complete(path, marker):
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        _write_model(tmp, arch, params, seed, dtype, None, None)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
