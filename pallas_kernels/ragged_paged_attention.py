"""Ragged paged attention as one Pallas kernel: Triton on GPU, interpret mode on CPU.

Same signature and semantics as `reference.paged_attention`: the step's query rows are
[decode rows | packed prefill rows] (see metadata.py), every sequence reads its keys and values from
the global page pool [layers, kv_heads, pages, page_size, head_dim] through its block table, causal
within a prefill chunk, GQA/MQA, optional sliding window and logit soft cap, float32 or
bf16-as-uint16 pools. Returns float32 [T, H, Dh]; padding rows are zeros.

How the work is cut
-------------------
One program handles one *query block* of one sequence for one KV head: up to `Qt` consecutive query
tokens of the sequence times the `G = H // KV` query heads that share the KV head, flattened to
`R` rows (row = token * G + head-in-group, padded to a power of two). It walks the sequence's
context in tiles of `pages_per_chunk` pages, gathering the tile's pages through the block table
straight from the pool (no copy of the pool, no per-layer slice: the layer index is a runtime
scalar), and keeps an online softmax (running max, running sum, rescaled accumulator) across tiles.
The tile loop starts at the first tile the sliding window can see and stops at the last key any
row of the block may attend to (causal), so short sequences and windowed layers cost what they use.

Decode and prefill run the same kernel body in two `pallas_call`s: decode blocks hold one token
(`Qt = 1`), prefill blocks `Qt` tokens (from `q_block`, capped so a block stays <= 128 rows). Each
prefill sequence is split into ceil(q_len / Qt) blocks and the blocks of all sequences are numbered
consecutively (a grid of a static upper bound; blocks past the end have no tokens and exit at once),
so a step with one long chunk and many short ones keeps every program busy.

Decode rows are also split along the context (split-K): program (h, i, s) walks the s-th run of
the row's visible tiles and writes its unnormalised output with its running max and sum; a small
XLA reduction (`_merge_splits`) rescales the parts to the overall max and normalises. On a GPU the
number of parts is picked so that about TARGET_PROGRAMS programs run (one program per decode row
and KV head walking a whole context left most of an H100 idle); interpret mode uses one part.

Query rows are gathered into the block layout and scattered back to the flat token order by XLA
outside the kernel (q-sized copies, tiny next to the KV traffic): the kernel's q and output then
have plain `BlockSpec`s and never touch rows of another sequence, so no masked loads or stores are
needed and the source stays within the generic Pallas API.

Platforms
---------
* GPU: lowers with Triton (`compiler_params=triton.CompilerParams`, which also stops jax >= 0.10
  from picking Mosaic GPU). Triton needs power-of-two block dims and matmul dims >= 16, hence
  `R >= 16`, power-of-two `head_dim`, `page_size` and `pages_per_chunk`, and
  `pages_per_chunk * page_size >= 16`. Scores and values are contracted in float32 at HIGHEST
  precision (no TF32), matching the reference to ~1e-6.
* CPU: Pallas only runs `interpret=True` there (picked automatically); that is for tests, not speed.
* TPU (Mosaic): not supported by this source. Mosaic cannot gather pages with a vector index from
  a pool in HBM; a TPU version needs the pool in `pl.ANY` memory with explicit async copies per page
  (as in jax's `ops/tpu/ragged_paged_attention`). Use the "xla" backend there until then.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_write import write_kv
from pallas_kernels.metadata import AttentionMetadata
from pallas_kernels.reference import BF16_STORAGE

NEG_INF = float("-inf")
MIN_ROWS = 16  # Triton's tl.dot needs every matmul dimension >= 16
MAX_ROWS = 128  # query rows per prefill block: bounds the accumulator's registers on GPU


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _values(x: jax.Array) -> jax.Array:
    """Pool tile (as stored) -> float32; bf16 pools hold uint16 bit patterns."""
    if x.dtype == BF16_STORAGE:
        x = lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(jnp.float32)


def _dot(a: jax.Array, b: jax.Array, b_contract: int) -> jax.Array:
    """a [M, K] times b ([N, K] if b_contract == 1 else [K, N]) in full float32 (IEEE on Triton, not
    TF32): the kernel must match the XLA reference to ~1e-6."""
    dims = (((1,), (b_contract,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _attention_kernel(
    layer_ref,  # i32[1]
    tables_ref,  # i32[S, max_pages]  block tables (whole array)
    blk_seq_ref,  # i32[NB]  table row of each block's sequence
    blk_pos_ref,  # i32[NB]  position (in its sequence) of the block's first query token
    blk_ntok_ref,  # i32[NB]  query tokens in the block (0: nothing to do)
    q_ref,  # f32[R, Dh]  this block's rows, pre-scaled (BlockSpec)
    k_ref,  # [L, KV, N, P, Dh]  the whole pool
    v_ref,
    acc_ref,  # f32[R, Dh]  unnormalised output of this part of the context (BlockSpec)
    m_ref,  # f32[R]  its running max (-inf: no visible key in this part)
    l_ref,  # f32[R]  its softmax denominator
    *,
    group: int,
    pages_per_chunk: int,
    sliding_window: int | None,
    soft_cap: float | None,
    splits: int,
):
    """Program (h, i, s): part s of `splits` of query block i's visible tiles, KV head h. The parts'
    partial softmax states are merged by `_merge_splits` outside the kernel."""
    h, i, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    R, Dh = q_ref.shape
    num_pages, page = k_ref.shape[2], k_ref.shape[3]
    tile = pages_per_chunk * page
    layer = layer_ref[0]
    seq, pos0, ntok = blk_seq_ref[i], blk_pos_ref[i], blk_ntok_ref[i]

    q = q_ref[...]
    tok = jnp.arange(R, dtype=jnp.int32) // group  # row -> token inside the block
    row_valid = tok < ntok
    q_pos = pos0 + tok  # [R]
    # Keys this block can see: [first key of the window of its first token, its last token].
    kv_end = jnp.where(ntok > 0, pos0 + ntok, 0)
    c_end = (kv_end + tile - 1) // tile
    c_start = 0
    if sliding_window is not None:
        c_start = jnp.minimum(jnp.maximum(pos0 - sliding_window + 1, 0) // tile, c_end)
    if splits > 1:  # this program's share of the tiles: consecutive runs of equal length
        per = (c_end - c_start + splits - 1) // splits
        c_start = jnp.minimum(c_start + part * per, c_end)
        c_end = jnp.minimum(c_start + per, c_end)

    def body(c, carry):
        m, l, acc = carry
        pages = tables_ref[seq, pl.ds(c * pages_per_chunk, pages_per_chunk)]
        pages = jnp.minimum(pages, num_pages - 1)  # junk table entries past the context stay in bounds
        k = _values(k_ref[layer, h, pages]).reshape(tile, Dh)
        v = _values(v_ref[layer, h, pages]).reshape(tile, Dh)
        s = _dot(q, k, 1)  # [R, tile]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = c * tile + jnp.arange(tile, dtype=jnp.int32)
        valid = (k_pos[None, :] <= q_pos[:, None]) & row_valid[:, None]
        if sliding_window is not None:
            valid &= k_pos[None, :] > (q_pos[:, None] - sliding_window)
        s = jnp.where(valid, s, NEG_INF)
        # Online softmax; rows with nothing visible yet keep m = -inf and contribute exact zeros.
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + p.sum(axis=1)
        return m_new, l, acc * alpha[:, None] + _dot(p, v, 0)

    init = (
        jnp.full((R,), NEG_INF, jnp.float32),
        jnp.zeros((R,), jnp.float32),
        jnp.zeros((R, Dh), jnp.float32),
    )
    m, l, acc = lax.fori_loop(c_start, c_end, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Partial softmax states of the context parts (axis 2) -> normalised output [KV, NB, R, Dh].

    Rescales each part to the overall max; parts that saw no key (m = -inf) weigh exactly zero, and
    rows that saw none at all come out as zeros."""
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - jnp.where(m_all == NEG_INF, 0.0, m_all))  # [KV, NB, S, R]
    num = (w[..., None] * acc).sum(axis=2)
    den = (w * l).sum(axis=2)
    return num / jnp.where(den == 0.0, 1.0, den)[..., None]


def _run_blocks(
    q_blocks, k_cache, v_cache, layer, tables, blocks, *, group, ppc, window, cap, interpret, splits=1
):
    """q_blocks [KV, NB, R, Dh] -> out [KV, NB, R, Dh]: one program per (KV head, block, context part).

    blocks = (table row, first query position, query tokens) per block, each i32[NB]. With
    `splits` > 1 each block's visible tiles are cut into that many runs, one program each (more
    programs in flight for few, long decodes), merged afterwards by `_merge_splits`."""
    KV, NB, R, Dh = q_blocks.shape
    q_spec = pl.BlockSpec((None, None, R, Dh), lambda h, i, s: (h, i, 0, 0))
    acc_spec = pl.BlockSpec((None, None, None, R, Dh), lambda h, i, s: (h, i, s, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, R), lambda h, i, s: (h, i, s, 0))
    whole = pl.no_block_spec  # metadata and the pool: the kernel indexes them itself
    kernel = functools.partial(
        _attention_kernel,
        group=group,
        pages_per_chunk=ppc,
        sliding_window=window,
        soft_cap=cap,
        splits=splits,
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(KV, NB, splits),
        in_specs=[whole] * 5 + [q_spec, whole, whole],
        out_specs=[acc_spec, row_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct((KV, NB, splits, R, Dh), jnp.float32),
            jax.ShapeDtypeStruct((KV, NB, splits, R), jnp.float32),
            jax.ShapeDtypeStruct((KV, NB, splits, R), jnp.float32),
        ],
        interpret=interpret,
        # Triton params select the Triton lowering on GPU (jax >= 0.10 defaults to Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="ragged_paged_attention",
    )(
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        tables.astype(jnp.int32),
        *blocks,
        q_blocks,
        k_cache,
        v_cache,
    )
    return _merge_splits(acc, m, l)


def _pad_rows(x: jax.Array, R: int) -> jax.Array:
    """[KV, NB, rows, Dh] -> [KV, NB, R, Dh] (zero rows at the end)."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, R - x.shape[2]), (0, 0)))


def _decode(
    q, k_cache, v_cache, layer, block_tables, context_lens, *, G, ppc, window, cap, interpret, splits=1
):
    """q [D, KV, G, Dh] (scaled): one block per decode row, its single token at position ctx - 1."""
    D, KV, _, Dh = q.shape
    R = _pow2(max(G, MIN_ROWS))
    q_blocks = _pad_rows(q.transpose(1, 0, 2, 3), R)
    ctx = context_lens.astype(jnp.int32)
    out = _run_blocks(
        q_blocks, k_cache, v_cache, layer, block_tables,
        (jnp.arange(D, dtype=jnp.int32), jnp.maximum(ctx - 1, 0), (ctx > 0).astype(jnp.int32)),
        group=G, ppc=ppc, window=window, cap=cap, interpret=interpret, splits=splits,
    )  # fmt: skip
    return out[:, :, :G].transpose(1, 0, 2, 3)  # [D, KV, G, Dh]


def _prefill(q, k_cache, v_cache, layer, meta: AttentionMetadata, *, G, Qt, ppc, window, cap, interpret):
    """q [Tq, KV, G, Dh] (scaled) packed prefill rows -> [Tq, KV, G, Dh], padding rows zero."""
    Tq, KV, _, Dh = q.shape
    Sp = meta.prefill_q_len.shape[0]
    live = jnp.arange(Sp) < meta.num_prefill_seqs
    q_len = jnp.where(live, meta.prefill_q_len, 0).astype(jnp.int32)
    q_start = meta.prefill_q_start.astype(jnp.int32)
    prefix = meta.prefill_context_lens.astype(jnp.int32) - q_len
    # Blocks of Qt tokens, numbered consecutively over the sequences.
    n_blk = (q_len + Qt - 1) // Qt
    blk_end = jnp.cumsum(n_blk)
    blk_first = blk_end - n_blk
    NB = min(Tq, -(-Tq // Qt) + Sp)  # static bound on sum(ceil(q_len / Qt))
    b = jnp.arange(NB, dtype=jnp.int32)
    seq = jnp.minimum(jnp.sum(blk_end[None, :] <= b[:, None], axis=1), Sp - 1).astype(jnp.int32)
    rel0 = (b - blk_first[seq]) * Qt  # first token of the block, relative to its chunk
    ntok = jnp.where(b < blk_end[-1], jnp.clip(q_len[seq] - rel0, 0, Qt), 0).astype(jnp.int32)
    # Gather the query rows into blocks: [KV, NB, Qt * G, Dh].
    tok = jnp.clip(q_start[seq][:, None] + rel0[:, None] + jnp.arange(Qt)[None, :], 0, Tq - 1)
    q_blocks = q[tok].transpose(2, 0, 1, 3, 4).reshape(KV, NB, Qt * G, Dh)
    R = _pow2(max(Qt * G, MIN_ROWS))
    out = _run_blocks(
        _pad_rows(q_blocks, R), k_cache, v_cache, layer, meta.prefill_block_tables,
        (seq, prefix[seq] + rel0, ntok), group=G, ppc=ppc, window=window, cap=cap, interpret=interpret,
    )  # fmt: skip
    out = out[:, :, : Qt * G].reshape(KV, NB, Qt, G, Dh)
    # Scatter back: flat prefill row t belongs to sequence j when q_start[j] <= t < q_start[j] + q_len[j].
    t = jnp.arange(Tq, dtype=jnp.int32)
    inside = (t[:, None] >= q_start[None, :]) & (t[:, None] < (q_start + q_len)[None, :])
    owner = jnp.argmax(inside, axis=1)
    rel = t - q_start[owner]
    rows = out[:, blk_first[owner] + rel // Qt, rel % Qt]  # [KV, Tq, G, Dh]
    return jnp.where(inside.any(axis=1)[:, None, None, None], rows.transpose(1, 0, 2, 3), 0.0)


# Bytes of one K (or V) tile a Triton program may hold. Triton double-buffers the K and V tiles in
# shared memory: 4 x 64 KiB (4 pages of 32 tokens x head_dim 128 x float32) asked for 264 KiB on an
# H100, whose limit is 227 KiB, and failed to launch. 32 KiB tiles stay well inside every GPU's limit.
MAX_TILE_BYTES = 32 * 1024


def _fit_shared_memory(ppc: int, page_size: int, head_dim: int, itemsize: int) -> int:
    """Halve pages_per_chunk (keeping it a divisor of the table width) until a K/V tile fits."""
    while ppc > 1 and ppc * page_size * head_dim * itemsize > MAX_TILE_BYTES and ppc * page_size > MIN_ROWS:
        ppc //= 2
    return ppc


# Programs to aim for on a GPU: a few per streaming multiprocessor (132 on an H100), so that the
# gathers of many tiles are in flight at once. One program per (decode row, KV head) walking a whole
# context read KV at only 110-220 GB/s on an H100 (3-9% of its copy bandwidth).
TARGET_PROGRAMS = 1024
MAX_SPLITS = 16


def _auto_splits(programs: int, tiles: int) -> int:
    """Context parts per decode row: enough for TARGET_PROGRAMS, at most one per tile."""
    return max(1, min(MAX_SPLITS, tiles, -(-TARGET_PROGRAMS // max(programs, 1))))


def _check_triton_shapes(head_dim: int, page_size: int, ppc: int) -> None:
    """Triton blocks are power-of-two tensors and tl.dot wants every dimension >= 16: fail here with
    a clear message rather than inside the Triton compiler."""
    for what, n in (("head_dim", head_dim), ("page_size", page_size), ("pages_per_chunk", ppc)):
        if n & (n - 1):
            raise ValueError(f"the Pallas/Triton kernel needs a power-of-two {what}, got {n}")
    if ppc * page_size < MIN_ROWS or head_dim < MIN_ROWS:
        raise ValueError(
            f"the Pallas/Triton kernel needs pages_per_chunk * page_size >= {MIN_ROWS} and head_dim >= "
            f"{MIN_ROWS}, got {ppc} * {page_size} and {head_dim}"
        )


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
    context_splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of the step's flat query rows q [T, H, Dh] over the page pool (see metadata.py).

    `pages_per_chunk`: pages per KV tile (clipped to the block-table width, which it must divide).
    `q_block`: query tokens per prefill program (capped so that q_block * G <= 128 rows).
    `context_splits`: programs per decode row and KV head, each over a run of its context's tiles
    (split-K; merged afterwards). None: 1 in interpret mode, else enough to give a GPU several
    programs per SM (`_auto_splits`).
    `interpret=None` picks Pallas interpret mode on CPU. Returns [T, H, Dh] float32.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    meta = jax.tree_util.tree_map(jnp.asarray, meta)
    T, H, Dh = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    D = meta.num_decode_rows
    ppc = min(pages_per_chunk, meta.decode_block_tables.shape[1])  # as the reference: same tiles
    for table in (meta.decode_block_tables, meta.prefill_block_tables):
        if table.shape[0] and table.shape[1] % ppc:
            raise ValueError(f"block table width {table.shape[1]} must be a multiple of pages_per_chunk")
    if not interpret:
        ppc = _fit_shared_memory(ppc, k_cache.shape[3], Dh, jnp.dtype(k_cache.dtype).itemsize)
        _check_triton_shapes(Dh, k_cache.shape[3], ppc)
    qg = q.reshape(T, KV, G, Dh).astype(jnp.float32) * scale
    kw = dict(G=G, ppc=ppc, window=sliding_window, cap=soft_cap, interpret=interpret)
    parts = []
    if D:
        tiles = max(1, meta.decode_block_tables.shape[1] // ppc)
        splits = context_splits or (1 if interpret else _auto_splits(D * KV, tiles))
        if splits < 1:
            raise ValueError(f"context_splits must be >= 1, got {splits}")
        parts.append(
            _decode(
                qg[:D],
                k_cache,
                v_cache,
                layer,
                meta.decode_block_tables,
                meta.decode_context_lens,
                splits=min(splits, tiles),
                **kw,
            )  # fmt: skip
        )
    if T > D:
        Qt = max(1, min(q_block, MAX_ROWS // G, T - D))
        parts.append(_prefill(qg[D:], k_cache, v_cache, layer, meta, Qt=Qt, **kw))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return out.reshape(T, H, Dh)


__all__ = ["paged_attention", "write_kv"]
