"""Linear layers: `x @ w` with float32 accumulation, through XLA's dot or a packed-weight CPU kernel.

Matmul backends (`matmul_backend` on LLM / the CLI):
  "xla"  jnp.dot with operands in the weight dtype and float32 accumulation: runs everywhere; on a
         CPU with AMX, bf16 x bf16 -> f32 is several times faster than float32.
  "cpu"  weights packed once for a compiled XLA:CPU FFI kernel: float32 weights into 64-column
         panels for an AVX-512 FMA kernel (pallas_kernels.cpu.packed_matmul), bfloat16 weights into
         AMX tile layout for a TDPBF16PS kernel (pallas_kernels.cpu.amx_matmul). XLA:CPU re-packs
         weights on every dot call and is weakest at decode-sized row counts.
  "auto" "cpu" on the CPU platform when the kernel for the weights' dtype runs here, else "xla".

`Linear` is the one projection layer every model uses (its `kernel` may be a plain array, stacked
per layer, or a packed weight), so quantization, LoRA and sharding have one place to hook in.
`pack_params` rewrites a model's state dict for the "cpu" backend (every `kernel` becomes a
`PackedWeight` or `AmxPackedWeight`, the bf16 SwiGLU [gate | up] weights packed so that the AMX
kernel also applies the SiLU gate, see `gated_mlp_input`; tied embeddings also get a packed copy
as an explicit "lm_head"); `unpack_params` undoes it (for checkpoints). `linear` dispatches on the
weight's type, so model code is the same for every backend.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
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
PACKED_TYPES = (PackedWeight, AmxPackedWeight)


def linear(
    x: jax.Array,
    w: jax.Array | PackedWeight | AmxPackedWeight,
    layer: jax.Array | None = None,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """x [T, K] @ w [K, N] -> float32 [T, N].

    A packed weight may be the whole per-layer stack (see `Linear.weight`); `layer` picks one.
    `valid_rows` (i32[4]: rows [v0, v1) and [v2, v3) are real tokens) lets the packed kernel skip
    padding rows (their outputs are zero then); XLA's dot computes every row."""
    if isinstance(w, PackedWeight):
        return packed_matmul(x.astype(jnp.float32), w, layer, valid_rows)
    if isinstance(w, AmxPackedWeight):
        if w.swiglu:
            raise ValueError("a swiglu-packed weight returns the gated activation: use gated_mlp_input")
        return amx_matmul(x, w, layer, valid_rows)
    return jnp.dot(
        x.astype(w.dtype), w, precision=float32_precision(w.dtype), preferred_element_type=jnp.float32
    )


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), float32 out. With `num_layers`, one kernel per layer stacked on a
    leading axis (the layers run under `lax.scan`; `layer` picks one).

    `axes` are the kernel's logical axis names (`nnx.Param` metadata `logical_axes`), which
    `pagedjax/parallel/` maps to mesh axes; a stacked kernel has "layers" in front."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype,
        *,
        num_layers: int | None = None,
        use_bias: bool = False,
        axes: tuple[str, str] = ("embed", "mlp"),
    ):
        lead = () if num_layers is None else (num_layers,)
        lead_axes = () if num_layers is None else ("layers",)
        kernel = jnp.zeros((*lead, in_features, out_features), dtype)
        self.kernel = nnx.Param(kernel, logical_axes=(*lead_axes, *axes))
        bias = None
        if use_bias:  # biases are tiny: they stay float32
            zeros = jnp.zeros((*lead, out_features), jnp.float32)
            bias = nnx.Param(zeros, logical_axes=(*lead_axes, axes[1]))
        self.bias = nnx.data(bias)

    def weight(self, layer: jax.Array | None):
        """(weight, layer argument for `linear`): a packed stack stays whole (the kernel reads layer
        `layer` in place; a scan slice of a custom call's operand would be copied every layer), a
        plain stack is sliced."""
        w = self.kernel.get_value()
        if layer is None or isinstance(w, PACKED_TYPES):
            return w, layer
        return lax.dynamic_index_in_dim(w, layer, keepdims=False), None

    def __call__(
        self, x: jax.Array, layer: jax.Array | None = None, valid_rows: jax.Array | None = None
    ) -> jax.Array:
        w, idx = self.weight(layer)
        y = linear(x, w, idx, valid_rows)
        if self.bias is not None:
            b = self.bias.get_value()
            y = y + (b if layer is None else lax.dynamic_index_in_dim(b, layer, keepdims=False))
        return y


def gated_mlp_input(
    x: jax.Array,
    w_gate_up: jax.Array | PackedWeight | AmxPackedWeight,
    layer: jax.Array | None = None,
    valid_rows: jax.Array | None = None,
    activation: str = "silu",
) -> jax.Array:
    """act(x @ W_gate) * (x @ W_up) for a fused [gate | up] weight: the down projection's input.

    The AMX kernel computes SiLU inside the matmul (bf16 out) when the weight was packed for it
    (SwiGLU models only); otherwise the product is split and activated here (float32)."""
    if isinstance(w_gate_up, AmxPackedWeight) and w_gate_up.swiglu:
        if activation != "silu":
            raise ValueError(f"a swiglu-packed weight applies SiLU, not {activation}")
        return amx_matmul(x, w_gate_up, layer, valid_rows)
    gate, up = jnp.split(linear(x, w_gate_up, layer, valid_rows), 2, axis=-1)
    if activation == "silu":
        return jax.nn.silu(gate) * up
    return jax.nn.gelu(gate, approximate=True) * up


def float32_precision(dtype) -> lax.Precision | None:
    """Float32 weights get full float32 products. XLA's default precision for f32 dots on GPU is a
    reduced-precision pass (TF32 or bf16: errors ~1e-3 on an H100), which breaks the float32 logit
    parity a user of dtype="float32" expects; on CPU it changes nothing. Lower-precision weights
    keep the default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def resolve_matmul_backend(name: str, params: dict, platform: str | None = None) -> str:
    """Map "auto" to "cpu" or "xla" (see the module docstring); validate explicit names."""
    if name not in MATMUL_BACKENDS:
        raise ValueError(f"matmul_backend must be one of {MATMUL_BACKENDS}, got {name!r}")
    dtype = next(w for _, w in kernel_leaves(params)).dtype
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


def kernel_leaves(params: dict, prefix: tuple = ()) -> Iterable[tuple[tuple, object]]:
    """(path, value) of every `Linear` kernel in a model's state dict."""
    for key, value in params.items():
        if isinstance(value, dict):
            yield from kernel_leaves(value, (*prefix, key))
        elif key == "kernel":
            yield (*prefix, key), value


def _replace(params: dict, path: tuple, value) -> dict:
    """A copy of the nested dict `params` with `path` set to `value` (shared sub-dicts elsewhere)."""
    head, *rest = path
    out = dict(params)
    out[head] = _replace(params.get(head, {}), tuple(rest), value) if rest else value
    return out


def pack_params(params: dict, swiglu_paths: Iterable[tuple] = ()) -> dict:
    """A copy of a model state dict with every `Linear` kernel packed for the "cpu" matmul backend
    (the kernel follows the weights' dtype: float32 -> AVX-512 panels, bfloat16 -> AMX tiles).

    `swiglu_paths`: kernels holding a fused [gate | up] SwiGLU weight, which the bf16 kernel can
    pack so that it applies the SiLU gate itself. A tied embedding gets a packed transpose as an
    explicit "lm_head" (the model then uses it instead of the embedding table)."""
    swiglu = set(swiglu_paths)
    out = params
    for path, w in kernel_leaves(params):
        bf16 = w.dtype == jnp.bfloat16
        if bf16 and path in swiglu and swiglu_packable(w.shape[-1]):
            out = _replace(out, path, pack_weight_bf16(w, swiglu=True))  # activation fused in
        else:
            out = _replace(out, path, (pack_weight_bf16 if bf16 else pack_weight)(w))
    if "lm_head" not in params:
        table = params["embed"]["embedding"]
        pack = pack_weight_bf16 if table.dtype == jnp.bfloat16 else pack_weight
        out = _replace(out, ("lm_head", "kernel"), pack(table.T))
    return out


def _unpack(w):
    if isinstance(w, PackedWeight):
        return unpack_weight(w)
    if isinstance(w, AmxPackedWeight):
        return unpack_weight_bf16(w)
    return w


def unpack_params(params: dict, tie_word_embeddings: bool) -> dict:
    """Inverse of `pack_params` (a no-op on unpacked parameters)."""
    out = params
    for path, w in kernel_leaves(params):
        out = _replace(out, path, _unpack(w))
    if tie_word_embeddings and "lm_head" in out:
        out = {k: v for k, v in out.items() if k != "lm_head"}
    return out
