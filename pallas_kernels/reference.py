"""Paged attention in plain XLA (jax.numpy + lax loops): the reference every kernel is checked against,
and the default backend on CPU.

Page pool layout, per K and per V:  [num_layers, num_kv_heads, num_pages, page_size, head_dim]
(KV-head-major). A gathered chunk comes out as [kv_heads, seqs, tokens, head_dim], which is already
the batch-major layout the score and value contractions want: no transpose copies per chunk
(measured ~1.5x faster than a [pages, page, kv_heads, dim] layout for decode on CPU).

Why loops over KV chunks with an online softmax instead of gathering a whole context at once:
a gather-everything decode step materialises [seqs, max_context, heads, dim] per layer, which on
CPU costs more than the matmuls; walking the context in chunks of `pages_per_chunk` pages keeps the
working set in cache and stops at the longest real context in the batch (dynamic trip count),
so short batches are cheap without recompiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.metadata import AttentionMetadata


def _einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Float32 einsum at full precision: XLA's default on GPU is a TF32/bf16 pass (~1e-3 error),
    too coarse for the reference the kernels are tested against. No effect on CPU."""
    return jnp.einsum(eq, a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


NEG_INF = float("-inf")

# bfloat16 pools are stored as their uint16 bit patterns: XLA:CPU lowers a bf16 scatter to a
# whole-buffer conversion (~150 ms per layer for an 800 MB pool) while a uint16 scatter is in place
# (~0.03 ms). Reads bitcast back, so the values are exactly the bf16 ones.
BF16_STORAGE = jnp.uint16


def to_storage(x: jax.Array, storage_dtype) -> jax.Array:
    """Convert K/V values to the pool's storage dtype."""
    if storage_dtype == BF16_STORAGE:
        return lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_STORAGE)
    return x.astype(storage_dtype)


def from_storage(x: jax.Array) -> jax.Array:
    """Pool values (as stored) -> float32."""
    if x.dtype == BF16_STORAGE:
        x = lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(jnp.float32)


def write_kv(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    k: jax.Array,
    v: jax.Array,
    slot_pages: jax.Array,
    slot_offsets: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V ([T, kv_heads, dim]) into their pool slots, in place when donated.

    Padding tokens carry `slot_pages == num_pages` (out of range) and are dropped.
    """
    # (layer, :, pages, offsets): the advanced-index dims [T] come first, so updates are [T, KV, D].
    k_cache = k_cache.at[layer, :, slot_pages, slot_offsets].set(to_storage(k, k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, :, slot_pages, slot_offsets].set(to_storage(v, v_cache.dtype), mode="drop")
    return k_cache, v_cache


def gather_pages(cache: jax.Array, layer: jax.Array | int, pages: jax.Array) -> jax.Array:
    """Pool pages -> float32 [KV, *pages.shape, page_size, head_dim], in one gather.

    The layer and KV-head indices are folded into one leading index so that no per-layer slice
    of the pool is ever materialised.
    """
    L, KV = cache.shape[:2]
    flat = cache.reshape(L * KV, *cache.shape[2:])
    rows = (layer * KV + jnp.arange(KV)).reshape((KV,) + (1,) * pages.ndim)
    return from_storage(flat[rows, pages[None]])


def _cdiv(a, b):
    return (a + b - 1) // b


def _online_softmax_update(carry, s, v, v_eq):
    """One chunk of the streaming softmax. s: [..., k] scores (-inf where masked), v: values,
    v_eq: the einsum that contracts probabilities with values."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = l * alpha + p.sum(-1)
    acc = acc * alpha[..., None] + _einsum(v_eq, p, v)
    return m_new, l, acc


def _cap(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def _decode_attention(
    q,
    k_cache,
    v_cache,
    layer,
    block_tables,
    context_lens,
    *,
    scale,
    sliding_window,
    soft_cap,
    pages_per_chunk,
):
    """q: [D, H, Dh], one query per sequence at position context_len - 1."""
    D, H, Dh = q.shape
    _, KV, _, page, _ = k_cache.shape
    G = H // KV
    chunk = pages_per_chunk * page
    assert block_tables.shape[1] % pages_per_chunk == 0, "block table width must be a multiple of the chunk"
    qg = (q.reshape(D, KV, G, Dh).astype(jnp.float32) * scale).transpose(1, 0, 2, 3)  # [KV, D, G, Dh]
    q_pos = context_lens - 1
    n_chunks = _cdiv(jnp.max(context_lens), chunk)
    first_chunk = 0
    if sliding_window is not None:
        live = context_lens > 0
        lo = jnp.min(jnp.where(live, jnp.maximum(q_pos - sliding_window + 1, 0), jnp.iinfo(jnp.int32).max))
        first_chunk = jnp.minimum(lo, jnp.max(context_lens)) // chunk

    def body(c, carry):
        pages = lax.dynamic_slice_in_dim(block_tables, c * pages_per_chunk, pages_per_chunk, axis=1)
        k = gather_pages(k_cache, layer, pages).reshape(KV, D, chunk, Dh)
        v = gather_pages(v_cache, layer, pages).reshape(KV, D, chunk, Dh)
        s = _cap(_einsum("hbgd,hbkd->hbgk", qg, k), soft_cap)
        k_pos = c * chunk + jnp.arange(chunk)
        valid = k_pos[None, :] < context_lens[:, None]
        if sliding_window is not None:
            valid &= k_pos[None, :] > (q_pos[:, None] - sliding_window)
        s = jnp.where(valid[None, :, None, :], s, NEG_INF)
        return _online_softmax_update(carry, s, v, "hbgk,hbkd->hbgd")

    init = (
        jnp.full((KV, D, G), NEG_INF, jnp.float32),
        jnp.zeros((KV, D, G), jnp.float32),
        jnp.zeros((KV, D, G, Dh), jnp.float32),
    )
    m, l, acc = lax.fori_loop(first_chunk, n_chunks, body, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.transpose(1, 0, 2, 3).reshape(D, H, Dh)


def _prefill_attention(
    q,
    k_cache,
    v_cache,
    layer,
    meta: AttentionMetadata,
    *,
    scale,
    sliding_window,
    soft_cap,
    pages_per_chunk,
    q_block,
):
    """q: [Tq, H, Dh] packed prefill rows; causal within each sequence, reading keys from the pool."""
    Tq, H, Dh = q.shape
    _, KV, _, page, _ = k_cache.shape
    G = H // KV
    chunk = pages_per_chunk * page
    q_block = min(q_block, Tq)
    qp = jnp.pad(q.reshape(Tq, KV, G, Dh).astype(jnp.float32) * scale, ((0, q_block), (0, 0), (0, 0), (0, 0)))
    out0 = jnp.zeros_like(qp)

    def seq_body(j, out):
        q_start = meta.prefill_q_start[j]
        q_len = meta.prefill_q_len[j]
        ctx = meta.prefill_context_lens[j]
        prefix = ctx - q_len
        table = meta.prefill_block_tables[j]

        def qblock_body(b, out):
            row0 = q_start + b * q_block
            qb = lax.dynamic_slice_in_dim(qp, row0, q_block, axis=0)  # [Qb, KV, G, Dh]
            rel = b * q_block + jnp.arange(q_block)
            row_valid = rel < q_len
            q_pos = prefix + rel
            kv_end = jnp.minimum(ctx, prefix + (b + 1) * q_block)
            c0 = 0
            if sliding_window is not None:
                c0 = jnp.maximum(prefix + b * q_block - sliding_window + 1, 0) // chunk

            def kv_body(c, carry):
                pages = lax.dynamic_slice_in_dim(table, c * pages_per_chunk, pages_per_chunk)
                k = gather_pages(k_cache, layer, pages).reshape(KV, chunk, Dh)
                v = gather_pages(v_cache, layer, pages).reshape(KV, chunk, Dh)
                s = _cap(_einsum("qhgd,hkd->hgqk", qb, k), soft_cap)
                k_pos = c * chunk + jnp.arange(chunk)
                valid = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < ctx) & row_valid[:, None]
                if sliding_window is not None:
                    valid &= k_pos[None, :] > (q_pos[:, None] - sliding_window)
                s = jnp.where(valid[None, None], s, NEG_INF)
                return _online_softmax_update(carry, s, v, "hgqk,hkd->hgqd")

            init = (
                jnp.full((KV, G, q_block), NEG_INF, jnp.float32),
                jnp.zeros((KV, G, q_block), jnp.float32),
                jnp.zeros((KV, G, q_block, Dh), jnp.float32),
            )
            m, l, acc = lax.fori_loop(c0, _cdiv(kv_end, chunk), kv_body, init)
            res = (acc / jnp.where(l == 0, 1.0, l)[..., None]).transpose(2, 0, 1, 3)  # [Qb, KV, G, Dh]
            cur = lax.dynamic_slice_in_dim(out, row0, q_block, axis=0)
            new = jnp.where(row_valid[:, None, None, None], res, cur)
            return lax.dynamic_update_slice_in_dim(out, new, row0, axis=0)

        return lax.fori_loop(0, _cdiv(q_len, q_block), qblock_body, out)

    out = lax.fori_loop(0, meta.num_prefill_seqs, seq_body, out0)
    return out[:Tq].reshape(Tq, H, Dh)


def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    pages_per_chunk: int = 4,
    q_block: int = 64,
) -> jax.Array:
    """Attention of the step's flat query rows q [T, H, Dh] over the page pool (see metadata.py).

    Decode rows and prefill rows are handled by two loops so that neither pays for the other's shape.
    Returns [T, H, Dh] float32; padding rows are zero.
    """
    meta = jax.tree_util.tree_map(jnp.asarray, meta)  # numpy metadata works eagerly too
    for table in (meta.decode_block_tables, meta.prefill_block_tables):
        if table.shape[0] and table.shape[1] % min(pages_per_chunk, table.shape[1]):
            raise ValueError(f"block table width {table.shape[1]} must be a multiple of pages_per_chunk")
    D = meta.num_decode_rows
    T = q.shape[0]
    ppc = min(pages_per_chunk, meta.decode_block_tables.shape[1])
    kw = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, pages_per_chunk=ppc)
    parts = []
    if D:
        parts.append(
            _decode_attention(
                q[:D], k_cache, v_cache, layer, meta.decode_block_tables, meta.decode_context_lens, **kw
            )
        )
    if T > D:
        parts.append(_prefill_attention(q[D:], k_cache, v_cache, layer, meta, q_block=q_block, **kw))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def gather_all_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    token_block_tables: jax.Array,
    token_positions: jax.Array,
    token_context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """The obvious version, for tests and as the benchmark baseline: every query row gathers its
    sequence's whole context ([T, max_pages * page, KV, Dh]) and runs a masked softmax.

    token_block_tables: [T, max_pages] (each row: its sequence's table), token_positions: [T],
    token_context_lens: [T] (keys visible to the row's sequence; 0 for padding rows).
    """
    T, H, Dh = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    k = gather_pages(k_cache, layer, token_block_tables).reshape(KV, T, -1, Dh)
    v = gather_pages(v_cache, layer, token_block_tables).reshape(KV, T, -1, Dh)
    qg = q.reshape(T, KV, G, Dh).astype(jnp.float32) * scale
    s = _cap(_einsum("thgd,htkd->thgk", qg, k), soft_cap)
    k_pos = jnp.arange(k.shape[2])
    valid = (k_pos[None, :] <= token_positions[:, None]) & (k_pos[None, :] < token_context_lens[:, None])
    if sliding_window is not None:
        valid &= k_pos[None, :] > (token_positions[:, None] - sliding_window)
    s = jnp.where(valid[:, None, None, :], s, NEG_INF)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - jnp.where(m == NEG_INF, 0.0, m))
    l = p.sum(-1, keepdims=True)
    out = _einsum("thgk,htkd->thgd", p / jnp.where(l == 0, 1.0, l), v)
    return out.reshape(T, H, Dh)
