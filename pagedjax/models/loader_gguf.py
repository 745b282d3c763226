"""Load a GGUF file (llama.cpp's format) as Hugging Face-named float32 tensors, a config, and a tokenizer.

    ckpt = read_gguf("model.gguf")
    config = ModelConfig.from_hf_config(ckpt.hf_config)
    params = build_params(ckpt.tensors, config, "float32")  # pagedjax.models.registry
    tokenizer = load_gguf_tokenizer("model.gguf")

What differs from a Hugging Face checkpoint, and is undone here:

* Names: llama.cpp's (`blk.0.attn_q.weight`) become Hugging Face's (`model.layers.0.self_attn.q_proj.weight`).
* Shapes: GGUF lists dimensions fastest-moving first, so a Linear weight `[out, in]` is stored with
  shape `(in, out)`; read as a row-major array it is `[out, in]` again.
* Quantization: blocks (Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with numpy. Q4_0, Q4_1
  and Q8_0 (what small models ship in) have fast paths here, every other type goes through
  `gguf.quants.dequantize`; both give the same bits.
* RoPE layout: llama.cpp's converter permutes the rows of `attn_q`/`attn_k` inside every head from
  Hugging Face's "rotate half" order to interleaved pairs. `_unpermute` reverses it.
* Llama 3 RoPE scaling: stored as a `rope_freqs` tensor of per-frequency divisors; it is recognised
  as llama3-style scaling and turned back into a `rope_scaling` dict (or rejected).

The metadata header is parsed here with `struct` over a memory map rather than with
`gguf.GGUFReader`, which walks the 100k-string vocabulary one numpy view at a time (seconds for a
135M model); the tensor data is only touched when it is dequantized.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)

# --------------------------------------------------------------------------------------------------
# The file format: header, metadata, tensor table.
# --------------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
# metadata value types with a fixed width: u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

# ggml type ids stored as plain values rather than blocks
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30
_GGML_Q4_0, _GGML_Q4_1, _GGML_Q8_0 = 2, 3, 8


class GGUFTensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: the reverse of the dimensions the file lists
    ggml_type: int
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


class _Reader:
    """Sequential little-endian reads over a bytes-like buffer (an mmap)."""

    def __init__(self, buf: Any, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start = self.pos
        self.pos += length
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", self.buf, self.pos)
            self.pos += 8 + length

    def value(self, value_type: int, keep_strings: bool) -> Any:
        if value_type in _SCALAR_FORMATS:
            (value,) = self.unpack(_SCALAR_FORMATS[value_type])
            # float32 metadata (rope base, norm epsilon) as the decimal it was written from:
            # 1e-05 rather than 9.999999747378752e-06
            return float(str(np.float32(value))) if value_type == _FLOAT32 else value
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack("IQ")
            if element_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[element_type]
                values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
                self.pos += count * struct.calcsize("<" + fmt)
                return values
            if element_type == _STRING:
                if keep_strings:
                    return [self.string() for _ in range(count)]
                self.skip_strings(count)
                return _SkippedArray(count)
            if element_type == _ARRAY:  # nested arrays: never needed here, walk past them
                return [self.value(_ARRAY, keep_strings) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {value_type}")


@dataclass(frozen=True)
class _SkippedArray:
    """A string array that was not materialised (the vocabulary when only the config is wanted)."""

    count: int


def _ggml_block(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) for a ggml type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}") from None


def read_gguf_metadata(
    path: str | os.PathLike, string_arrays: Container[str] = ()
) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse a GGUF file's metadata and tensor table without reading any tensor data.

    String arrays (the vocabulary, the merges) are only decoded for the keys in `string_arrays`;
    the others come back as a `_SkippedArray` holding their length.
    """
    path = os.fspath(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm, path)
        if mm[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        r.pos = 4
        (version,) = r.unpack("I")
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"{path} is GGUF version {version}; supported versions: {_GGUF_VERSIONS}")
        tensor_count, kv_count = r.unpack("QQ")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = r.string()
            (value_type,) = r.unpack("I")
            metadata[key] = r.value(value_type, key in string_arrays)

        table = []
        for _ in range(tensor_count):
            name = r.string()
            (n_dims,) = r.unpack("I")
            dims = r.unpack(f"{n_dims}Q")
            ggml_type, offset = r.unpack("IQ")
            table.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = (r.pos + alignment - 1) // alignment * alignment
        file_size = len(mm)

    infos = []
    for name, shape, ggml_type, offset in table:
        block_elems, block_bytes = _ggml_block(ggml_type)
        count = math.prod(shape)
        if count % block_elems:
            raise ValueError(f"{path}: tensor {name} has {count} elements, not a multiple of its block size")
        nbytes = count // block_elems * block_bytes
        start = data_start + offset
        if start + nbytes > file_size:
            raise ValueError(f"{path} is truncated: tensor {name} runs past the end of the file")
        infos.append(GGUFTensorInfo(name, shape, ggml_type, start, nbytes))
    return metadata, infos


# --------------------------------------------------------------------------------------------------
# Dequantization.
# --------------------------------------------------------------------------------------------------


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes [start, start+2) of every block, as a float32 column."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] float32: low nibbles are elements 0-15, high nibbles 16-31."""
    out = np.empty((qs.shape[0], 2, qs.shape[1]), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, 0], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 1], casting="unsafe")
    return out.reshape(qs.shape[0], -1)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (uint8) -> float32 array of `shape` (numpy order). Always a fresh array."""
    if ggml_type == _GGML_F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == _GGML_F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ggml_type == _GGML_BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if ggml_type == _GGML_Q8_0:  # [d: f16][32 x int8]
        blocks = raw.reshape(-1, 34)
        return np.multiply(blocks[:, 2:].view(np.int8), _half(blocks, 0), dtype=np.float32).reshape(shape)
    if ggml_type == _GGML_Q4_0:  # [d: f16][16 bytes of nibbles], value = d * (q - 8)
        blocks = raw.reshape(-1, 18)
        out = _nibbles(blocks[:, 2:])
        out -= 8
        out *= _half(blocks, 0)
        return out.reshape(shape)
    if ggml_type == _GGML_Q4_1:  # [d: f16][m: f16][16 bytes of nibbles], value = d * q + m
        blocks = raw.reshape(-1, 20)
        out = _nibbles(blocks[:, 4:])
        out *= _half(blocks, 0)
        out += _half(blocks, 2)
        return out.reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    block_elems, block_bytes = _ggml_block(ggml_type)
    rows = raw.reshape(-1, shape[-1] // block_elems * block_bytes)
    try:
        out = gguf_dequantize(rows, GGMLQuantizationType(ggml_type))
    except NotImplementedError as e:
        raise ValueError(f"cannot dequantize ggml type {GGMLQuantizationType(ggml_type).name}: {e}") from None
    return np.array(out, dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Llama: names, RoPE permutation, config.
# --------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor, or None for one with no Hugging Face counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a q/k weight [n_heads*head_dim, in] (or bias).

    llama.cpp turns each head's rows from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] ("rotate half") into
    interleaved pairs [x_0, y_0, x_1, y_1, ...]; this puts them back.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    )


def _llama3_frequency_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """llama3-style RoPE scaling as llama.cpp stores it: the divisor of every inverse frequency."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium))


def _llama3_rope_scaling(
    rope_freqs: np.ndarray, head_dim: int, theta: float, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Recognise llama.cpp's `rope_freqs` tensor as llama3-style RoPE scaling parameters ({} if trivial)."""
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2:
        raise ValueError(f"rope_freqs has {factors.size} entries, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return {}
    key = "llama.rope.scaling.original_context_length"
    originals = [int(metadata[key])] if key in metadata else [8192, 4096, 2048, 16384, 32768]
    factor = float(np.round(factors.max(), 4))
    for original in originals:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
            if np.allclose(
                _llama3_frequency_factors(head_dim, theta, scaling), factors, rtol=1e-3, atol=1e-4
            ):
                return scaling
    raise ValueError(
        "this GGUF stores RoPE frequency factors (rope_freqs) that do not match llama3-style scaling; "
        "pagedjax cannot reproduce its positional encoding"
    )


@dataclass
class GGUFCheckpoint:
    """A GGUF model as a Hugging Face config dict and float32 tensors under Hugging Face names/layouts."""

    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # GGUF key/values (vocab not decoded)
    path: str | None = None

    @property
    def model_config(self):
        from pagedjax.config import ModelConfig

        return ModelConfig.from_hf_config(self.hf_config)


def _hf_config(metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo], path: str) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata has no {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list) or isinstance(heads, list):
        raise ValueError(f"{path}: per-layer head counts are not supported")
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"{path}: partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) unsupported"
        )
    if int(metadata.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise ValueError(f"{path}: mixture-of-experts GGUF models are not supported")
    embed = infos.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    vocab = int(metadata.get(f"{arch}.vocab_size", embed.shape[0]))

    rope_scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    elif scaling_type not in (None, "none"):
        raise ValueError(
            f"{path}: RoPE scaling type {scaling_type!r} is not supported (supported: linear, llama3)"
        )

    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": "blk.0.attn_q.bias" in infos,
        "bos_token_id": bos,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file: Hugging Face config dict + float32 tensors under HF names.

    Raises ValueError for other architectures, unsupported features, or unknown tensors.
    """
    path = os.fspath(path)
    metadata, info_list = read_gguf_metadata(path)
    infos = {info.name: info for info in info_list}
    hf_config = _hf_config(metadata, infos, path)
    n_heads, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]

    unknown = [n for n in infos if hf_tensor_name(n) is None and n != "rope_freqs.weight"]
    if unknown:
        raise ValueError(
            f"{path}: tensors with no Llama counterpart (unsupported model variant): {unknown[:8]}"
        )

    blob = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray view: cheap slicing
    tensors: dict[str, np.ndarray] = {}
    rope_freqs = None
    for name, info in infos.items():
        raw = blob[info.offset : info.offset + info.nbytes]
        value = dequantize(raw, info.ggml_type, info.shape)
        if name == "rope_freqs.weight":
            rope_freqs = value
            continue
        if ".attn_q." in name:
            value = _unpermute(value, n_heads)
        elif ".attn_k." in name:
            value = _unpermute(value, n_kv)
        tensors[hf_tensor_name(name)] = value
    del blob

    if rope_freqs is not None:
        scaling = _llama3_rope_scaling(rope_freqs, hf_config["head_dim"], hf_config["rope_theta"], metadata)
        hf_config["rope_scaling"] = scaling or hf_config["rope_scaling"]
    return GGUFCheckpoint(hf_config=hf_config, tensors=tensors, metadata=metadata, path=path)


# --------------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------------

# byte-level BPE vocabularies whose pre-tokenizer is GPT-2's regex (what `ByteLevel(use_regex=True)` does);
# SmolLM's llama.cpp pre-tokenizer also splits digits, but its vocabulary has no token with a digit
# next to anything else, so that changes nothing.
_BYTE_LEVEL_PRE = {None, "default", "gpt2", "smollm"}
_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_tokenizer(metadata: dict[str, Any]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # stored as text rather than in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # control tokens (<|im_end|>, ...) match whole and are special; user-defined ones match whole too
    tk.add_special_tokens(
        [
            AddedToken(tok, normalized=False, special=True)
            for tok, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL and set(tok) <= alphabet
        ]
    )
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, types, strict=False)
        if kind == _USER_DEFINED
    ]
    if user:
        tk.add_tokens(user)

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        pre = [(tokens[bos_id], bos_id)] if add_bos else []
        post = [(tokens[eos_id], eos_id)] if add_eos else []
        single = " ".join([t for t, _ in pre] + ["$A"] + [t for t, _ in post])
        pair = " ".join([t for t, _ in pre] + ["$A"] + [t for t, _ in post] + [t for t, _ in pre] + ["$B:1"])
        pair += "".join(f" {t}:1" for t, _ in post)
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pre + post)
    return tk


def load_gguf_tokenizer(path: str | os.PathLike):
    """A transformers `PreTrainedTokenizerFast` for a GGUF file, with its chat template and bos/eos/unk/pad.

    Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"` with GPT-2's pre-tokenizer) are built
    directly from the metadata with `tokenizers` (fast, no torch). Anything else is delegated to
    transformers' own GGUF tokenizer conversion. Works offline.
    """
    path = os.fspath(path)
    metadata, _ = read_gguf_metadata(path, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    model = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in _BYTE_LEVEL_PRE or "tokenizer.ggml.tokens" not in metadata:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True
        )

    from transformers import PreTrainedTokenizerFast

    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(metadata),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        name_or_path=path,
    )
