"""The chunked online-softmax `paged_attention` (the engine's XLA backend) against the obvious
`gather_all_paged_attention` and a plain NumPy reference, on random ragged steps.

A small random "scheduler" in this file builds each step the way the engine does: sequences get pages
from a random permutation of the pool, block tables are padded (with junk page ids) to a multiple of
pages_per_chunk, the step's query rows are [decode rows | packed prefill rows], padding rows/slots have
context 0, padding tokens write to page == num_pages (dropped). The pool starts full of finite garbage;
each sequence's earlier tokens are placed in it directly and this step's new K/V go through `write_kv`,
exactly as in the model (write, then attend).

The NumPy reference knows nothing about pages: per sequence, causal softmax attention of its query
rows over its own K/V (GQA: query head h reads kv head h // (H // KV)), with the sliding window and
soft cap applied as in Gemma/Mistral.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import AttentionMetadata, gather_all_paged_attention, paged_attention, write_kv
from pallas_kernels.reference import BF16_STORAGE, to_storage

NUM_LAYERS, LAYER = 2, 1  # attend in layer 1 so that layer indexing into the pool is exercised
MAX_PAGES = 12  # block-table width, a multiple of every pages_per_chunk used here
EXTRA_PAGES = 5  # pool pages no sequence owns (garbage that must never be read unmasked)


@dataclass(frozen=True)
class Case:
    """Static configuration: everything that changes the compiled program."""

    H: int
    KV: int
    Dh: int
    page: int
    dtype: str = "float32"  # pool dtype: "float32" or "bfloat16" (stored as uint16)
    window: int | None = None
    cap: float | None = None
    D: int = 4  # decode rows
    Sp: int = 3  # prefill sequence slots
    Tq: int = 96  # packed prefill rows (> q_block, so long chunks take several query blocks)
    ppc: int = 4  # pages_per_chunk
    q_block: int = 64

    @property
    def max_ctx(self) -> int:
        return MAX_PAGES * self.page

    @property
    def num_pages(self) -> int:
        return (self.D + self.Sp) * MAX_PAGES + EXTRA_PAGES

    @property
    def storage(self):
        return BF16_STORAGE if self.dtype == "bfloat16" else jnp.float32

    def __str__(self) -> str:
        s = f"G{self.H // self.KV}-H{self.H}-KV{self.KV}-d{self.Dh}-p{self.page}-{self.dtype}"
        s += f"-D{self.D}-Tq{self.Tq}-ppc{self.ppc}-qb{self.q_block}"
        if self.window is not None:
            s += f"-win{self.window}"
        if self.cap is not None:
            s += f"-cap{self.cap:g}"
        return s


CASES = [
    # GQA ratio 1 / 4 / 8, head_dim 64 / 128, page 8 / 16 / 32
    Case(H=4, KV=4, Dh=64, page=8),
    Case(H=8, KV=2, Dh=128, page=16),
    Case(H=8, KV=1, Dh=64, page=32),
    # sliding window (shorter and longer than a KV chunk), soft cap, both
    Case(H=8, KV=2, Dh=64, page=16, window=20),
    Case(H=16, KV=2, Dh=128, page=8, cap=5.0),
    Case(H=4, KV=4, Dh=128, page=32, window=150, cap=3.0),
    # other chunking: 2 pages per KV chunk, 16-row query blocks
    Case(H=8, KV=1, Dh=64, page=8, ppc=2, q_block=16, window=37),
    # decode-only and prefill-only steps (the engine's buckets include D = 0 and Tq = 0)
    Case(H=8, KV=2, Dh=64, page=16, D=8, Sp=0, Tq=0),
    Case(H=8, KV=2, Dh=64, page=8, D=0, Sp=4, Tq=64, window=24),
    # bfloat16 pools
    Case(H=8, KV=2, Dh=64, page=16, dtype="bfloat16"),
    Case(H=16, KV=2, Dh=128, page=8, dtype="bfloat16", window=30),
    Case(H=4, KV=4, Dh=64, page=32, dtype="bfloat16", cap=4.0),
]


# ------------------------------------------------------------------------------------------------
# The little scheduler: a plan (context lengths) -> pool contents, metadata, slot mapping.
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    decode: list[int]  # context length per decode row, this step's token included; 0 = padding row
    prefill: list[tuple[int, int]]  # (tokens already in the pool, tokens in this chunk) per sequence


@dataclass
class Step:
    q: np.ndarray  # [T, H, Dh] f32
    k_new: np.ndarray  # [T, KV, Dh] this step's K (garbage on padding rows)
    v_new: np.ndarray
    slot_pages: np.ndarray  # [T]
    slot_offsets: np.ndarray
    k_pool: np.ndarray  # storage dtype, prior context placed, new tokens not yet written
    v_pool: np.ndarray
    expected_k_pool: np.ndarray  # k_pool after write_kv
    expected_v_pool: np.ndarray
    meta: AttentionMetadata
    tok_tables: np.ndarray  # gather_all inputs, per row
    tok_pos: np.ndarray
    tok_ctx: np.ndarray
    seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]]  # (K, V, Q rows, row ids) per seq
    padding_rows: list[int]


def _storage_np(x: np.ndarray, case: Case) -> np.ndarray:
    """NumPy twin of `to_storage` (bf16: round to nearest even, keep the top 16 bits); no device
    round trip per array. test_storage_twin checks it against to_storage."""
    x = np.ascontiguousarray(x, np.float32)
    if case.storage != BF16_STORAGE:
        return x.copy()
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _values_np(stored: np.ndarray) -> np.ndarray:
    """Stored pool values -> float32 (bf16 bit patterns decoded)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def build_step(case: Case, plan: Plan, seed: int) -> Step:
    rng = np.random.default_rng(seed)
    D, Tq, Sp, P, KV, Dh = case.D, case.Tq, case.Sp, case.page, case.KV, case.Dh
    T = D + Tq
    shape = (NUM_LAYERS, KV, case.num_pages, P, Dh)
    k_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)  # finite garbage
    v_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)
    # Queries scaled up so that softmaxes are peaked and soft caps bite.
    q = (2.0 * rng.normal(size=(T, case.H, Dh))).astype(np.float32)
    k_new = rng.normal(size=(T, KV, Dh)).astype(np.float32)
    v_new = rng.normal(size=(T, KV, Dh)).astype(np.float32)
    slot_pages = np.full(T, case.num_pages, np.int32)
    slot_offsets = rng.integers(0, P, T).astype(np.int32)  # padding offsets: anything
    perm = iter(rng.permutation(case.num_pages))

    def table_for(ctx: int) -> np.ndarray:
        own = [int(next(perm)) for _ in range(-(-ctx // P))]
        junk = rng.integers(0, case.num_pages, MAX_PAGES - len(own))
        return np.concatenate([own, junk]).astype(np.int32)

    seqs, padding_rows = [], []
    tok_tables = rng.integers(0, case.num_pages, (T, MAX_PAGES)).astype(np.int32)
    tok_pos = np.zeros(T, np.int32)
    tok_ctx = np.zeros(T, np.int32)

    def add_sequence(table, ctx, n_new, row0):
        """Sequence of ctx tokens whose last n_new are this step's rows [row0, row0 + n_new)."""
        k_seq = rng.normal(size=(ctx, KV, Dh)).astype(np.float32)
        v_seq = rng.normal(size=(ctx, KV, Dh)).astype(np.float32)
        pos = np.arange(ctx)
        prior = pos[: ctx - n_new]
        for pool, x in ((k_pool, k_seq), (v_pool, v_seq)):
            pool[LAYER, :, table[prior // P], prior % P] = _storage_np(x[prior], case)
        rows = np.arange(row0, row0 + n_new)
        new = pos[ctx - n_new :]
        k_new[rows], v_new[rows] = k_seq[new], v_seq[new]
        slot_pages[rows], slot_offsets[rows] = table[new // P], new % P
        tok_tables[rows], tok_pos[rows], tok_ctx[rows] = table, new, ctx
        seqs.append((k_seq, v_seq, q[rows], list(rows)))

    d_tables = rng.integers(0, case.num_pages, (D, MAX_PAGES)).astype(np.int32)
    d_ctx = np.zeros(D, np.int32)
    for i, ctx in enumerate(plan.decode):
        if ctx == 0:
            padding_rows.append(i)
            continue
        d_tables[i] = table_for(ctx)
        d_ctx[i] = ctx
        add_sequence(d_tables[i], ctx, 1, i)

    p_tables = rng.integers(0, case.num_pages, (Sp, MAX_PAGES)).astype(np.int32)
    p_ctx, p_start, p_len = (np.zeros(Sp, np.int32) for _ in range(3))
    row = 0
    for j, (prefix, n) in enumerate(plan.prefill):
        p_tables[j] = table_for(prefix + n)
        p_ctx[j], p_start[j], p_len[j] = prefix + n, row, n
        add_sequence(p_tables[j], prefix + n, n, D + row)
        row += n
    padding_rows += list(range(D + row, T))

    expected_k, expected_v = k_pool.copy(), v_pool.copy()
    real = slot_pages < case.num_pages
    expected_k[LAYER, :, slot_pages[real], slot_offsets[real]] = _storage_np(k_new[real], case)
    expected_v[LAYER, :, slot_pages[real], slot_offsets[real]] = _storage_np(v_new[real], case)
    meta = AttentionMetadata(
        decode_block_tables=d_tables,
        decode_context_lens=d_ctx,
        prefill_block_tables=p_tables,
        prefill_context_lens=p_ctx,
        prefill_q_start=p_start,
        prefill_q_len=p_len,
        num_prefill_seqs=np.int32(len(plan.prefill)),
    )
    return Step(
        q, k_new, v_new, slot_pages, slot_offsets, k_pool, v_pool, expected_k, expected_v,
        meta, tok_tables, tok_pos, tok_ctx, seqs, padding_rows,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The plain NumPy reference.
# ------------------------------------------------------------------------------------------------


def numpy_attention(q, k, v, *, scale, window=None, cap=None) -> np.ndarray:
    """Causal attention of the last len(q) positions of one sequence over all its ctx = len(k) keys.
    q [n, H, Dh], k/v [ctx, KV, Dh] -> [n, H, Dh], in float64."""
    n, H, _ = q.shape
    ctx, KV, _ = k.shape
    kv_head = np.arange(H) // (H // KV)
    kh = k.astype(np.float64)[:, kv_head]  # [ctx, H, Dh]
    vh = v.astype(np.float64)[:, kv_head]
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64) * scale, kh)
    if cap is not None:
        s = cap * np.tanh(s / cap)
    q_pos = np.arange(ctx - n, ctx)[:, None]
    k_pos = np.arange(ctx)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, vh)


def reference_output(case: Case, step: Step, round_kv: bool) -> np.ndarray:
    out = np.zeros((case.D + case.Tq, case.H, case.Dh))
    for k_seq, v_seq, q_rows, rows in step.seqs:
        if round_kv:  # what a bf16 pool holds
            k_seq = _values_np(_storage_np(k_seq, case))
            v_seq = _values_np(_storage_np(v_seq, case))
        out[rows] = numpy_attention(
            q_rows, k_seq, v_seq, scale=case.Dh**-0.5, window=case.window, cap=case.cap
        )
    return out


# ------------------------------------------------------------------------------------------------
# The step under test: write_kv, then both attention implementations, in one jitted program.
# ------------------------------------------------------------------------------------------------


@functools.cache
def step_fn(case: Case):
    kw = dict(scale=case.Dh**-0.5, sliding_window=case.window, soft_cap=case.cap)

    @jax.jit
    def run(k_pool, v_pool, layer, q, k_new, v_new, slot_pages, slot_offsets, meta, tables, pos, ctx):
        k_pool, v_pool = write_kv(k_pool, v_pool, layer, k_new, v_new, slot_pages, slot_offsets)
        paged = paged_attention(
            q, k_pool, v_pool, layer, meta, pages_per_chunk=case.ppc, q_block=case.q_block, **kw
        )
        gathered = gather_all_paged_attention(q, k_pool, v_pool, layer, tables, pos, ctx, **kw)
        return paged, gathered, k_pool, v_pool

    return run


def check_step(case: Case, plan: Plan, seed: int) -> None:
    step = build_step(case, plan, seed)
    paged, gathered, k_pool, v_pool = jax.device_get(
        step_fn(case)(
            step.k_pool, step.v_pool, np.int32(LAYER), step.q, step.k_new, step.v_new,
            step.slot_pages, step.slot_offsets, step.meta, step.tok_tables, step.tok_pos, step.tok_ctx,
        )
    )  # fmt: skip
    assert paged.shape == (case.D + case.Tq, case.H, case.Dh) and paged.dtype == np.float32
    assert np.isfinite(paged).all() and np.isfinite(gathered).all()

    # write_kv wrote exactly this step's slots (padding tokens dropped), nothing else changed.
    np.testing.assert_array_equal(k_pool, step.expected_k_pool)
    np.testing.assert_array_equal(v_pool, step.expected_v_pool)

    # Padding rows are exactly zero.
    assert not np.any(paged[step.padding_rows]), "padding rows must be zeros"
    assert not np.any(gathered[step.padding_rows])

    # Against the reference computed from the values the pool really holds: f32-accumulation tight.
    exact = reference_output(case, step, round_kv=case.dtype == "bfloat16")
    np.testing.assert_allclose(paged, exact, rtol=0, atol=1e-5, err_msg=f"paged vs numpy, {plan}")
    np.testing.assert_allclose(gathered, exact, rtol=0, atol=1e-5, err_msg=f"gather-all vs numpy, {plan}")
    np.testing.assert_allclose(paged, gathered, rtol=0, atol=1e-5, err_msg=f"paged vs gather-all, {plan}")
    if case.dtype == "bfloat16":
        # Against float32 K/V: the only error is bf16 rounding of the pool.
        truth = reference_output(case, step, round_kv=False)
        rel = np.abs(paged - truth).max() / max(np.abs(truth).max(), 1e-30)
        assert rel <= 1e-2, f"bf16 pool: relative error {rel:.2e} > 1e-2, {plan}"


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def edge_plans(case: Case) -> list[Plan]:
    """Hand-picked steps: length 1, exact page and chunk boundaries, one long chunk with prior context
    (chunked-prefill continuation), padding everywhere, nothing at all."""
    P, chunk, top = case.page, case.ppc * case.page, case.max_ctx
    dec = [1, P, chunk, top, P + 1, 0, 2 * P, top - 1][: case.D]
    dec += [0] * (case.D - len(dec))
    plans = [Plan(dec, [])] if case.D else []
    if case.Sp:
        Tq = case.Tq
        pre = [(0, 1), (P, P), (chunk - 1, Tq - P - 1)]  # fills Tq exactly; the last one is long
        plans.append(Plan([0] * case.D, pre[: case.Sp]))
        plans.append(Plan(list(reversed(dec)), [(top - Tq, Tq)][: case.Sp]))  # a chunk ending at max_ctx
        plans.append(Plan(dec, [(2 * P, 1), (0, P + 3), (1, 2 * P - 1)][: case.Sp]))  # padding rows at end
    plans.append(Plan([0] * case.D, []))  # an all-padding step
    return [fit(case, p) for p in plans]


def fit(case: Case, plan: Plan) -> Plan:
    """Clip a plan to the case's static shapes: chunks within Tq, contexts within max_ctx."""
    prefill, budget = [], case.Tq
    for prefix, n in plan.prefill:
        n = min(n, budget)
        if n:
            prefill.append((min(prefix, case.max_ctx - n), n))
            budget -= n
    return Plan([min(c, case.max_ctx) for c in plan.decode], prefill)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_edge_steps(case: Case):
    for i, plan in enumerate(edge_plans(case)):
        check_step(case, plan, seed=i)


@st.composite
def plans(draw, case: Case) -> Plan:
    P, top = case.page, case.max_ctx
    special = sorted(
        {x for x in (1, 2, P - 1, P, P + 1, 2 * P, case.ppc * P, case.ppc * P + 1, top - 1, top) if x >= 1}
    )
    length = st.one_of(st.sampled_from(special), st.integers(1, top))
    decode = draw(st.lists(st.one_of(st.just(0), length), min_size=case.D, max_size=case.D))
    prefill, budget = [], case.Tq
    for _ in range(draw(st.integers(0, case.Sp))):
        if budget == 0:
            break
        n = min(draw(length), budget)
        prefix = min(draw(st.one_of(st.just(0), st.sampled_from(special), st.integers(0, top))), top - n)
        prefill.append((prefix, n))
        budget -= n
    return Plan(decode, prefill)


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_random_steps(case: Case, data, seed: int):
    check_step(case, data.draw(plans(case), label="plan"), seed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_touches_exactly_the_given_slots(dtype):
    case = Case(H=4, KV=2, Dh=16, page=8, dtype=dtype)
    rng = np.random.default_rng(0)
    L, N, P = 3, 10, case.page
    shape = (L, case.KV, N, P, case.Dh)
    write = jax.jit(write_kv)
    for layer in range(L):
        k_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)
        v_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)
        T = 24
        flat = rng.choice(N * P, T, replace=False)  # distinct slots anywhere in the pool
        pages, offsets = (flat // P).astype(np.int32), (flat % P).astype(np.int32)
        pad = rng.random(T) < 0.3
        pages[pad] = N  # padding tokens: dropped
        k = rng.normal(size=(T, case.KV, case.Dh)).astype(np.float32)
        v = rng.normal(size=(T, case.KV, case.Dh)).astype(np.float32)
        k_out, v_out = jax.device_get(write(k_pool, v_pool, np.int32(layer), k, v, pages, offsets))
        for before, after, x in ((k_pool, k_out, k), (v_pool, v_out, v)):
            assert after.dtype == before.dtype
            expected = before.copy()
            expected[layer, :, pages[~pad], offsets[~pad]] = _storage_np(x[~pad], case)
            np.testing.assert_array_equal(after, expected)
            written = np.zeros(shape, bool)
            written[layer, :, pages[~pad], offsets[~pad]] = True
            np.testing.assert_array_equal(after[~written], before[~written])  # everything else intact
            # The stored values are exactly the inputs (f32) or their bf16 rounding.
            got = _values_np(after[layer, :, pages[~pad], offsets[~pad]])  # [n, KV, Dh]
            tol = 0 if dtype == "float32" else 2**-8
            np.testing.assert_allclose(got, x[~pad], rtol=tol, atol=0)


def test_storage_twin():
    """The test's NumPy bf16 rounding is bit-identical to to_storage (ties, subnormals, extremes)."""
    case = Case(H=1, KV=1, Dh=1, page=1, dtype="bfloat16")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(size=10_000) * 10.0 ** rng.integers(-40, 38, 10_000),
            np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1e-45, 3.3e38, -3.3e38]),
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(_storage_np(x, case), np.asarray(to_storage(jnp.asarray(x), BF16_STORAGE)))
