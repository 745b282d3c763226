"""The compiled XLA:CPU paged-attention kernel (pallas_kernels.cpu) against the plain-XLA reference.

Random ragged steps ([decode rows | packed prefill rows], padding rows and junk block-table entries
included) over a pool full of finite garbage: GQA ratios 1/4/8, head_dim 64/128, page sizes 8/16/32,
lengths of 1 and exact page boundaries, sliding window, soft cap, float32 and bfloat16 (uint16 bits)
pools; then inside jax.jit and lax.scan with a traced layer index, the portable (non-AVX-512) build,
the build-failure fallback, and the engine's greedy tokens with either backend.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import AttentionMetadata, resolve_backend
from pallas_kernels import cpu as cpu_kernel
from pallas_kernels.reference import BF16_STORAGE, paged_attention, to_storage, write_kv

pytestmark = pytest.mark.skipif(
    not cpu_kernel.is_available(), reason=f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}"
)

NUM_LAYERS, LAYER = 3, 1
MAX_PAGES = 12  # block-table width (a multiple of the reference's pages_per_chunk)


@dataclass(frozen=True)
class Case:
    H: int
    KV: int
    Dh: int
    page: int
    bf16: bool = False
    window: int | None = None
    cap: float | None = None
    D: int = 6  # decode rows
    Sp: int = 4  # prefill sequence slots
    Tq: int = 80  # packed prefill rows

    def __str__(self) -> str:
        s = f"G{self.H // self.KV}-H{self.H}-KV{self.KV}-d{self.Dh}-p{self.page}"
        s += "-bf16" if self.bf16 else "-f32"
        s += f"-D{self.D}-Tq{self.Tq}"
        if self.window:
            s += f"-win{self.window}"
        if self.cap:
            s += f"-cap{self.cap:g}"
        return s

    @property
    def max_ctx(self) -> int:
        return MAX_PAGES * self.page

    @property
    def num_pages(self) -> int:
        return (self.D + self.Sp) * MAX_PAGES + 3


CASES = [
    # GQA 1 / 4 / 8, head_dim 64 / 128, page 8 / 16 / 32
    Case(H=4, KV=4, Dh=64, page=8),
    Case(H=8, KV=2, Dh=128, page=16),
    Case(H=8, KV=1, Dh=64, page=32),
    Case(H=12, KV=4, Dh=64, page=16),  # the 125M benchmark model's shape (G = 3)
    # sliding window, soft cap, both
    Case(H=8, KV=2, Dh=64, page=16, window=20),
    Case(H=16, KV=2, Dh=128, page=8, cap=5.0),
    Case(H=4, KV=4, Dh=128, page=32, window=150, cap=3.0),
    # decode-only and prefill-only steps
    Case(H=8, KV=2, Dh=64, page=16, D=8, Sp=0, Tq=0),
    Case(H=8, KV=1, Dh=64, page=8, D=0, Sp=4, Tq=64, window=24),
    # bfloat16 pools (uint16 bit patterns)
    Case(H=8, KV=2, Dh=64, page=16, bf16=True),
    Case(H=16, KV=2, Dh=128, page=8, bf16=True, window=30),
    Case(H=4, KV=4, Dh=64, page=32, bf16=True, cap=4.0),
    # a head_dim that is not a multiple of 16 (masked row tails)
    Case(H=4, KV=2, Dh=40, page=8, D=3, Sp=2, Tq=24),
]


@dataclass
class Plan:
    decode: list[int]  # context per decode row (0: padding row)
    prefill: list[tuple[int, int]]  # (prefix already in the pool, query rows) per prefill sequence


def edge_plans(case: Case) -> list[Plan]:
    """Lengths of 1, exact page boundaries, the full table, chunked-prefill continuations, padding."""
    P, top = case.page, case.max_ctx
    dec = ([1, P, 2 * P, top, P + 1, 0, top - 1, 3 * P - 1] * 2)[: case.D]
    plans = [Plan(dec, [])] if case.D else []
    if case.Sp:
        Tq = case.Tq
        pre = [(0, 1), (P - 1, P), (P, P), (2 * P - 3, Tq - 2 * P - 1)]
        plans.append(Plan([0] * case.D, pre[: case.Sp]))
        plans.append(Plan(dec[::-1], [(top - Tq, Tq)]))  # a chunk ending exactly at the table's end
        plans.append(Plan(dec, [(2 * P, 1), (0, P + 3), (1, 2 * P - 1)][: case.Sp]))  # padding rows
    plans.append(Plan([0] * case.D, []))  # all padding
    return [fit(case, p) for p in plans]


def random_plan(case: Case, rng: np.random.Generator) -> Plan:
    P, top = case.page, case.max_ctx
    special = [1, 2, P - 1, P, P + 1, 2 * P, top - 1, top]
    length = lambda: int(rng.choice(special)) if rng.random() < 0.4 else int(rng.integers(1, top + 1))
    decode = [0 if rng.random() < 0.15 else length() for _ in range(case.D)]
    prefill = [(int(rng.integers(0, top)), length()) for _ in range(int(rng.integers(0, case.Sp + 1)))]
    return fit(case, Plan(decode, prefill))


def fit(case: Case, plan: Plan) -> Plan:
    prefill, budget = [], case.Tq
    for prefix, n in plan.prefill[: case.Sp]:
        n = min(n, budget)
        if n:
            prefill.append((max(0, min(prefix, case.max_ctx - n)), n))
            budget -= n
    return Plan([min(c, case.max_ctx) for c in plan.decode], prefill)


def build_step(case: Case, plan: Plan, seed: int):
    """Query rows, both pools (f32 values and as stored) and metadata for one step."""
    rng = np.random.default_rng(seed)
    T = case.D + case.Tq
    shape = (NUM_LAYERS, case.KV, case.num_pages, case.page, case.Dh)
    k32 = rng.normal(size=shape).astype(np.float32)
    v32 = rng.normal(size=shape).astype(np.float32)
    q = (2.0 * rng.normal(size=(T, case.H, case.Dh))).astype(np.float32)  # peaked softmaxes
    perm = iter(rng.permutation(case.num_pages))

    def table(ctx):
        own = [int(next(perm)) for _ in range(-(-ctx // case.page))]
        junk = rng.integers(0, case.num_pages, MAX_PAGES - len(own))  # junk ids past the context
        return np.concatenate([own, junk]).astype(np.int32)

    Sp = max(case.Sp, 1)
    d_tables = rng.integers(0, case.num_pages, (case.D, MAX_PAGES)).astype(np.int32)
    d_ctx = np.zeros(case.D, np.int32)
    for i, ctx in enumerate(plan.decode):
        if ctx:
            d_tables[i], d_ctx[i] = table(ctx), ctx
    p_tables = rng.integers(0, case.num_pages, (Sp, MAX_PAGES)).astype(np.int32)
    p_ctx, p_start, p_len = (np.zeros(Sp, np.int32) for _ in range(3))
    row = 0
    for j, (prefix, n) in enumerate(plan.prefill):
        p_tables[j], p_ctx[j], p_start[j], p_len[j] = table(prefix + n), prefix + n, row, n
        row += n
    meta = AttentionMetadata(d_tables, d_ctx, p_tables, p_ctx, p_start, p_len, np.int32(len(plan.prefill)))
    padding = [i for i, c in enumerate(plan.decode) if c == 0] + list(range(case.D + row, T))
    return q, k32, v32, meta, padding


def storage(x: np.ndarray, case: Case) -> jax.Array:
    return to_storage(jnp.asarray(x), BF16_STORAGE if case.bf16 else jnp.float32)


@functools.cache
def fns(case: Case):
    kw = dict(scale=case.Dh**-0.5, sliding_window=case.window, soft_cap=case.cap)
    ref = jax.jit(lambda q, k, v, layer, m: paged_attention(q, k, v, layer, m, **kw))
    cpu = jax.jit(lambda q, k, v, layer, m: cpu_kernel.paged_attention(q, k, v, layer, m, **kw))
    return ref, cpu


def check(case: Case, plan: Plan, seed: int) -> None:
    q, k32, v32, meta, padding = build_step(case, plan, seed)
    ref, cpu = fns(case)
    k, v = storage(k32, case), storage(v32, case)
    layer = np.int32(LAYER)
    got = np.asarray(cpu(q, k, v, layer, meta))
    want = np.asarray(ref(q, k, v, layer, meta))
    assert got.shape == q.shape and got.dtype == np.float32 and np.isfinite(got).all()
    assert not np.any(got[padding]), "padding rows must be zeros"
    # Same pool values: only f32 summation order differs.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{case} {plan}")
    if case.bf16:  # against float32 K/V: the bf16 rounding of the pool is the only error
        truth = np.asarray(ref(q, jnp.asarray(k32), jnp.asarray(v32), layer, meta))
        rel = np.abs(got - truth).max() / max(np.abs(truth).max(), 1e-30)
        assert rel <= 1e-2, f"bf16 pool: relative error {rel:.2e}, {plan}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case):
    for i, plan in enumerate(edge_plans(case)):
        check(case, plan, seed=i)
    rng = np.random.default_rng(hash(str(case)) % 2**32)
    for i in range(3):
        check(case, random_plan(case, rng), seed=100 + i)


def test_eager_numpy_metadata_and_python_layer():
    case = CASES[3]
    q, k32, v32, meta, _ = build_step(case, edge_plans(case)[2], 0)
    got = cpu_kernel.paged_attention(q, k32, v32, 2, meta, scale=case.Dh**-0.5)  # numpy in, eagerly
    want = fns(case)[0](q, k32, v32, np.int32(2), meta)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_bfloat16_dtype_pool_reads_like_uint16_bits():
    case = Case(H=8, KV=2, Dh=64, page=16, bf16=True)
    q, k32, v32, meta, _ = build_step(case, edge_plans(case)[0], 0)
    k_bits, v_bits = storage(k32, case), storage(v32, case)
    as_bf16 = lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    a = cpu_kernel.paged_attention(q, k_bits, v_bits, LAYER, meta, scale=0.125)
    b = cpu_kernel.paged_attention(q, as_bf16(k_bits), as_bf16(v_bits), LAYER, meta, scale=0.125)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_inside_scan_with_traced_layer(bf16):
    """As in the model: lax.scan over layers, the layer index a traced scalar, pool in the carry."""
    case = Case(H=12, KV=4, Dh=64, page=16, bf16=bf16)
    q, k32, v32, meta, _ = build_step(case, edge_plans(case)[2], 3)
    k, v = storage(k32, case), storage(v32, case)
    qs = jnp.stack([jnp.asarray(q) * (1 + 0.5 * i) for i in range(NUM_LAYERS)])  # a different q per layer

    def run(attn):
        def body(carry, xs):
            kc, vc = carry
            qi, layer = xs
            return (kc, vc), attn(qi, kc, vc, layer, meta, scale=0.125)

        layers = jnp.arange(NUM_LAYERS, dtype=jnp.int32)
        return jax.jit(lambda k, v: jax.lax.scan(body, (k, v), (qs, layers))[1])(k, v)

    got, want = np.asarray(run(cpu_kernel.paged_attention)), np.asarray(run(paged_attention))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-2, "layers read different pool slices"


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[10]], ids=str)
def test_kernel_variants_agree(case, monkeypatch):
    """One thread vs all; the register-resident row kernel (decode rows) and the GEMM-shaped prefill
    kernel vs the dot-product block kernel."""
    q, k32, v32, meta, _ = build_step(case, edge_plans(case)[2], 0)
    k, v = storage(k32, case), storage(v32, case)
    kw = dict(scale=case.Dh**-0.5, sliding_window=case.window, soft_cap=case.cap)
    f = lambda: np.asarray(cpu_kernel.paged_attention(q, k, v, LAYER, meta, **kw))
    default = f()
    monkeypatch.setenv("PAGEDJAX_CPU_ATTN_THREADS", "1")
    np.testing.assert_array_equal(f(), default)
    # The dot-product block kernel only (no row kernel, no GEMM-shaped prefill kernel): another f32
    # summation order, so the reference check's tolerance.
    monkeypatch.setenv("PAGEDJAX_CPU_ATTN_GENERIC", "1")
    np.testing.assert_allclose(f(), default, rtol=0, atol=1e-5)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_build_without_avx512():
    """The plain-C++ path (what a CPU without AVX-512 compiles) gives the same answers."""
    target = "pagedjax_cpu_paged_attention_portable"
    flags = tuple(f for f in cpu_kernel.FLAGS if f != "-march=native") + ("-mno-avx512f",)
    lib = cpu_kernel.load(flags, target)
    assert lib.pagedjax_cpu_attention_has_avx512() == 0
    for case in (CASES[3], CASES[5], CASES[10], CASES[12]):
        q, k32, v32, meta, _ = build_step(case, edge_plans(case)[2], 0)
        k, v = storage(k32, case), storage(v32, case)
        kw = dict(scale=case.Dh**-0.5, sliding_window=case.window, soft_cap=case.cap)
        got = cpu_kernel.paged_attention(q, k, v, LAYER, meta, _target=target, **kw)
        want = fns(case)[0](q, k, v, np.int32(LAYER), meta)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=str(case))


def test_build_failure_falls_back_to_xla(monkeypatch, caplog, tmp_path):
    with pytest.raises(RuntimeError, match="compiling paged_attention.cc failed"):
        cpu_kernel.build(
            cpu_kernel.FLAGS + ("-DPAGEDJAX_NO_SUCH_HEADER", "-include", "no/such.h"), cache_dir=tmp_path
        )
    assert not [p for p in tmp_path.iterdir()], "a failed build leaves nothing in the cache"

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpu_kernel, "load", broken)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.cpu"):
        assert not cpu_kernel.is_available()
        assert not cpu_kernel.is_available()  # tried once, reason kept
    assert "no C++ compiler found" in cpu_kernel.unavailable_reason()
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    assert resolve_backend("auto", platform="cpu") == "xla"


def test_auto_resolves_to_cpu_kernel_on_cpu():
    assert resolve_backend("auto", platform="cpu") == "cpu"


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_engine_greedy_identical_xla_vs_cpu(model_dir, variant):
    from pagedjax.testing.capture import run_capturing_logits, small_engine

    # mistral with a sliding window shorter than the prompts: the windowed path runs in the engine.
    path = model_dir("llama") if variant == "llama" else model_dir("mistral", sliding_window=6)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (1, 9, 21, 14)]
    runs = {
        b: run_capturing_logits(small_engine(path, attention_backend=b), prompts, 6) for b in ("xla", "cpu")
    }
    xla, cpu = runs["xla"], runs["cpu"]
    assert xla.mixed_steps and cpu.mixed_steps, "decodes and prefill chunks shared a step"
    for rid_x, rid_c, prompt in zip(xla.request_ids, cpu.request_ids, prompts, strict=True):
        assert xla.outputs[rid_x] == cpu.outputs[rid_c]
        n = len(prompt) + 6 - 1
        np.testing.assert_allclose(cpu.logits_array(rid_c, n), xla.logits_array(rid_x, n), rtol=0, atol=1e-4)


def _new_rows(case: Case, padding: list[int], seed: int):
    """K/V rows for every query row and distinct random slots; padding rows get the drop slot."""
    rng = np.random.default_rng(seed)
    T = case.D + case.Tq
    k_new = rng.normal(size=(T, case.KV, case.Dh)).astype(np.float32)
    v_new = rng.normal(size=(T, case.KV, case.Dh)).astype(np.float32)
    flat = rng.choice(case.num_pages * case.page, T, replace=False)
    pages, offsets = (flat // case.page).astype(np.int32), (flat % case.page).astype(np.int32)
    pages[padding] = case.num_pages
    return k_new, v_new, pages, offsets


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[10]], ids=str)
def test_fused_kv_write_equals_write_then_attend(case: Case):
    """paged_attention_with_kv_write == reference write_kv + paged_attention: same output, and the
    pools (donated, written in place) equal the reference scatter bit for bit — padding dropped."""
    q, k32, v32, meta, padding = build_step(case, edge_plans(case)[2], 7)
    k_new, v_new, pages, offsets = _new_rows(case, padding, 8)
    kw = dict(scale=case.Dh**-0.5, sliding_window=case.window, soft_cap=case.cap)

    def ref(k, v):
        k, v = write_kv(k, v, LAYER, k_new, v_new, pages, offsets)
        return paged_attention(q, k, v, LAYER, meta, **kw), k, v

    fused = jax.jit(
        lambda k, v: cpu_kernel.paged_attention_with_kv_write(
            q, k, v, LAYER, meta, k_new, v_new, pages, offsets, **kw
        ),
        donate_argnums=(0, 1),
    )
    want_out, want_k, want_v = (np.asarray(x) for x in jax.jit(ref)(storage(k32, case), storage(v32, case)))
    got_out, got_k, got_v = (np.asarray(x) for x in fused(storage(k32, case), storage(v32, case)))
    np.testing.assert_allclose(got_out, want_out, rtol=0, atol=1e-5, err_msg=str(case))
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    assert not np.any(got_out[padding])


def test_fused_kv_write_bf16_rounding_of_special_values():
    """The vectorised float32 -> bfloat16 row conversion rounds like XLA's convert: ties to even,
    NaN stays NaN, infinities, signed zeros, subnormals and values that round up to infinity."""
    case = next(c for c in CASES if c.bf16)
    q, k32, v32, meta, padding = build_step(case, edge_plans(case)[2], 7)
    k_new, v_new, pages, offsets = _new_rows(case, padding, 8)
    special = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38, 1.00390625, 1.01171875],
        np.float32,
    )
    # NaNs whose low mantissa bits would carry into the exponent (or sign) under plain rounding
    carry = np.array([0x7FFFFFFF, 0x7F800001, 0xFF80FFFF], np.uint32).view(np.float32)
    special = np.concatenate([special, carry])
    k_new[0, 0, : special.size] = special
    k_new[0, 0, special.size : 2 * special.size] = special * np.float32(0.5)
    v_new[1, 0, : special.size] = special[::-1]
    fused = jax.jit(
        lambda k, v: cpu_kernel.paged_attention_with_kv_write(
            q, k, v, LAYER, meta, k_new, v_new, pages, offsets, scale=case.Dh**-0.5
        )
    )
    _, got_k, got_v = fused(storage(k32, case), storage(v32, case))
    want_k, want_v = jax.jit(lambda k, v: write_kv(k, v, LAYER, k_new, v_new, pages, offsets))(
        storage(k32, case), storage(v32, case)
    )
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x)
    np.testing.assert_array_equal(bits(got_k), bits(want_k))
    np.testing.assert_array_equal(bits(got_v), bits(want_v))


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_kv_write_inside_scan(bf16):
    """As the model runs it: pools in the scan carry, layer index traced; layer i writes layer i."""
    case = Case(H=12, KV=4, Dh=64, page=16, bf16=bf16)
    q, k32, v32, meta, padding = build_step(case, edge_plans(case)[2], 4)
    k_new, v_new, pages, offsets = _new_rows(case, padding, 5)
    ks = jnp.stack([jnp.asarray(k_new) * (1 + i) for i in range(NUM_LAYERS)])

    def run(step):
        def body(carry, xs):
            kc, vc = carry
            kn, layer = xs
            out, kc, vc = step(kc, vc, layer, kn)
            return (kc, vc), out

        layers = jnp.arange(NUM_LAYERS, dtype=jnp.int32)
        f = jax.jit(lambda k, v: jax.lax.scan(body, (k, v), (ks, layers)))
        (kc, vc), outs = f(storage(k32, case), storage(v32, case))
        return np.asarray(outs), np.asarray(kc), np.asarray(vc)

    def ref_step(kc, vc, layer, kn):
        kc, vc = write_kv(kc, vc, layer, kn, v_new, pages, offsets)
        return paged_attention(q, kc, vc, layer, meta, scale=0.125), kc, vc

    def fused_step(kc, vc, layer, kn):
        return cpu_kernel.paged_attention_with_kv_write(
            q, kc, vc, layer, meta, kn, v_new, pages, offsets, scale=0.125
        )

    got, want = run(fused_step), run(ref_step)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_engine_uses_the_fused_write_on_cpu():
    from pallas_kernels import get_fused_attention

    assert get_fused_attention("cpu") is cpu_kernel.paged_attention_with_kv_write
    assert get_fused_attention("xla") is None
