"""Pallas KV write: scatter one step's new K/V into their page-pool slots, in place.

Same signature and semantics as `reference.write_kv`: token t's K/V ([kv_heads, head_dim]) go to
slot `(slot_pages[t], slot_offsets[t])` of layer `layer`; padding tokens carry
`slot_pages == num_pages` and are dropped; every other slot keeps its value.

Why a kernel: the pool is the largest buffer of the engine and must never be copied. The kernel's
outputs alias its pool inputs (`input_output_aliases`), so with a donated pool (the model step
donates it) each program writes one [head_dim] row straight into the existing buffer, on GPU and
in interpret mode alike. The grid is (tokens, kv_heads): one program per row keeps every block a
single power-of-two [head_dim] vector (what Triton wants) whatever the number of KV heads.

Values are converted to the pool's storage dtype before the kernel (bf16 pools hold uint16 bit
patterns, see `reference.to_storage`), so the kernel itself is a plain typed copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import to_storage


def _write_kernel(layer_ref, pages_ref, offsets_ref, k_ref, v_ref, _k_in, _v_in, k_out, v_out):
    """Program (t, h): pool[layer, h, page_t, offset_t, :] = new[t, h, :] unless t is padding.

    `_k_in`/`_v_in` are the pools as inputs; they alias `k_out`/`v_out` and are never read.
    """
    t, h = pl.program_id(0), pl.program_id(1)
    page = pages_ref[t]
    num_pages = k_out.shape[2]

    @pl.when(page < num_pages)
    def _():
        layer, offset = layer_ref[0], offsets_ref[t]
        k_out[layer, h, page, offset, :] = k_ref[t, h, :]
        v_out[layer, h, page, offset, :] = v_ref[t, h, :]


def _write(k_cache, v_cache, layer, k, v, slot_pages, slot_offsets, *, interpret):
    T, KV, _ = k.shape
    return pl.pallas_call(
        _write_kernel,
        grid=(T, KV),
        out_shape=(
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ),
        input_output_aliases={5: 0, 6: 1},
        interpret=interpret,
        # Triton params select the Triton lowering on GPU (jax >= 0.10 defaults to Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        name="paged_kv_write",
    )(
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        slot_pages.astype(jnp.int32),
        slot_offsets.astype(jnp.int32),
        to_storage(k, k_cache.dtype),
        to_storage(v, v_cache.dtype),
        k_cache,
        v_cache,
    )


def write_kv(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    k: jax.Array,
    v: jax.Array,
    slot_pages: jax.Array,
    slot_offsets: jax.Array,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V ([T, kv_heads, dim]) into their pool slots, in place when donated.

    `interpret=None` picks Pallas interpret mode on CPU (the only mode Pallas has there).
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _write(k_cache, v_cache, layer, k, v, slot_pages, slot_offsets, interpret=interpret)
