"""Linear layers: `x @ w` with float32 accumulation, through XLA's dot or a packed-weight CPU kernel.

Matmul backends (`matmul_backend` on LLM / the CLI):
  "xla"  jnp.dot with operands in the weight dtype and float32 accumulation: runs everywhere; on a
         CPU with AMX, bf16 x bf16 -> f32 is several times faster than float32.
  "cpu"  weights packed once for a compiled XLA:CPU FFI kernel: float32 weights into 64-column
         panels for an AVX-512 FMA kernel (pallas_kernels.cpu.packed_matmul), bfloat16 weights into
         AMX tile layout for a TDPBF16PS kernel (pallas_kernels.cpu.amx_matmul). XLA:CPU re-packs
         weights on every dot call and is weakest at decode-sized row counts.
  "auto" "cpu" on the CPU platform when the kernel for the weights' dtype runs here, else "xla".

`pack_params` rewrites a parameter pytree for the "cpu" backend (every projection becomes a
`PackedWeight` or `AmxPackedWeight`, the bf16 MLP [gate | up] weight packed so that the AMX kernel
also applies the SiLU gate, see `swiglu_mlp_input`; tied embeddings also get a packed copy as
"lm_head_packed");
`unpack_params` undoes it (for checkpoints). `linear` dispatches on the weight's type, so model code
is the same for every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pagedjax.platform import default_matmul_backend, matmul_kernel_module
from pallas_kernels.cpu.amx_matmul import (
    AmxPackedWeight,
    amx_matmul,
    pack_weight_bf16,
    swiglu_packable,
    unpack_weight_bf16,
)
from pallas_kernels.cpu.packed_matmul import PackedWeight, pack_weight, packed_matmul, unpack_weight

MATMUL_BACKENDS = ("auto", "xla", "cpu")
PACKED_LAYER_WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down")
PACKED_TYPES = (PackedWeight, AmxPackedWeight)


def linear(
    x: jax.Array,
    w: jax.Array | PackedWeight | AmxPackedWeight,
    layer: jax.Array | None = None,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """x [T, K] @ w [K, N] -> float32 [T, N].

    A packed weight may be the whole per-layer stack (see `split_layer_weights`); `layer` picks one.
    `valid_rows` (i32[4]: rows [v0, v1) and [v2, v3) are real tokens) lets the packed kernel skip
    padding rows (their outputs are zero then); XLA's dot computes every row."""
    if isinstance(w, PackedWeight):
        return packed_matmul(x.astype(jnp.float32), w, layer, valid_rows)
    if isinstance(w, AmxPackedWeight):
        if w.swiglu:
            raise ValueError("a swiglu-packed weight returns the gated activation: use swiglu_mlp_input")
        return amx_matmul(x, w, layer, valid_rows)
    return jnp.dot(x.astype(w.dtype), w, precision=_precision(w.dtype), preferred_element_type=jnp.float32)


def swiglu_mlp_input(
    x: jax.Array,
    w_gate_up: jax.Array | PackedWeight | AmxPackedWeight,
    layer: jax.Array | None = None,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """silu(x @ W_gate) * (x @ W_up) for a fused [gate | up] weight: the down projection's input.

    The AMX kernel computes it inside the matmul (bf16 out) when the weight was packed for it;
    otherwise the product is split and activated here (float32)."""
    if isinstance(w_gate_up, AmxPackedWeight) and w_gate_up.swiglu:
        return amx_matmul(x, w_gate_up, layer, valid_rows)
    gate, up = jnp.split(linear(x, w_gate_up, layer, valid_rows), 2, axis=-1)
    return jax.nn.silu(gate) * up


def _precision(dtype) -> lax.Precision | None:
    """Float32 weights get full float32 products. XLA's default precision for f32 dots on GPU is a
    reduced-precision pass (TF32 or bf16: errors ~1e-3 on an H100), which breaks the float32 logit
    parity a user of dtype="float32" expects; on CPU it changes nothing. Lower-precision weights
    keep the default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def split_layer_weights(layers: dict) -> tuple[dict, dict]:
    """Stacked per-layer weights -> (slice per layer in the scan, pass whole to the kernel).

    Packed weights stay whole: the kernel reads layer `i` in place, whereas a scan slice of a
    custom call's operand is materialised as a copy of the weight on every layer of every step."""
    whole = {k: v for k, v in layers.items() if isinstance(v, PACKED_TYPES)}
    return {k: v for k, v in layers.items() if k not in whole}, whole


def lm_head(h: jax.Array, params: dict) -> jax.Array:
    """Logits (float32) of normalised hidden states: the LM head, or the tied embedding matrix."""
    for key in ("lm_head_packed", "lm_head"):
        if key in params:
            return linear(h, params[key])
    embed = params["embed"]
    return lax.dot_general(
        h.astype(embed.dtype),
        embed,
        (((1,), (1,)), ((), ())),
        precision=_precision(embed.dtype),
        preferred_element_type=jnp.float32,
    )


def resolve_matmul_backend(name: str, params: dict, platform: str | None = None) -> str:
    """Map "auto" to "cpu" or "xla" (see the module docstring); validate explicit names."""
    if name not in MATMUL_BACKENDS:
        raise ValueError(f"matmul_backend must be one of {MATMUL_BACKENDS}, got {name!r}")
    dtype = params["layers"]["wqkv"].dtype
    kernel = matmul_kernel_module(dtype)
    if name == "cpu":
        if kernel is None:
            raise ValueError(f"matmul_backend='cpu' packs float32 or bfloat16 weights, not {dtype}")
        if not kernel.is_available():
            raise RuntimeError(kernel.unavailable_reason())
        return "cpu"
    if name == "xla":
        return "xla"
    return default_matmul_backend(dtype, platform)


def pack_params(params: dict) -> dict:
    """A copy of `params` with every projection packed for the "cpu" matmul backend (the kernel
    follows the weights' dtype: float32 -> AVX-512 panels, bfloat16 -> AMX tiles)."""
    bf16 = params["layers"]["wqkv"].dtype == jnp.bfloat16
    pack = pack_weight_bf16 if bf16 else pack_weight  # both cast to their dtype
    out = dict(params)
    out["layers"] = dict(params["layers"])
    for key in PACKED_LAYER_WEIGHTS:
        w = params["layers"][key]
        if bf16 and key == "w_gate_up" and swiglu_packable(w.shape[-1]):
            out["layers"][key] = pack_weight_bf16(w, swiglu=True)  # activation fused into the kernel
        else:
            out["layers"][key] = pack(w)
    if "lm_head" in params:
        out["lm_head"] = pack(params["lm_head"])
    else:
        out["lm_head_packed"] = pack(params["embed"].T)
    return out


def _unpack(w):
    if isinstance(w, PackedWeight):
        return unpack_weight(w)
    if isinstance(w, AmxPackedWeight):
        return unpack_weight_bf16(w)
    return w


def unpack_params(params: dict) -> dict:
    """Inverse of `pack_params` (a no-op on unpacked parameters)."""
    out = {k: v for k, v in params.items() if k != "lm_head_packed"}
    out["layers"] = {k: _unpack(v) for k, v in params["layers"].items()}
    if "lm_head" in out:
        out["lm_head"] = _unpack(out["lm_head"])
    return out
