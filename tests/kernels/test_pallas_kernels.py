"""The Pallas kernels (interpret mode on CPU) against the plain-XLA reference and a NumPy reference.

* ragged paged attention (`pallas_kernels.ragged_paged_attention`) on random ragged steps built by the
  little scheduler of test_attention_reference.py: GQA ratios 1/3/4/8, head_dim 64/128, pages 8/16/32,
  decode rows mixed with short and long prefill chunks, lengths 1 and exact page/tile boundaries,
  padding rows, sliding window, soft cap, float32 and bf16 (uint16-stored) pools;
* the KV-write kernel (`pallas_kernels.kv_write`): exactly the step's slots change, padding dropped,
  in place when the pool is donated;
* the GPU path: both kernels lower to Triton custom calls for "cuda" on this CPU-only machine;
* the engine: greedy outputs (and logits) identical with attention_backend="xla" and "pallas".

Tolerances (from the issue): float32 max abs error <= 1e-5; bf16 pools: relative error <= 1e-2
against float32 K/V. Both implementations read the same pool values and accumulate in float32, so
the kernel is also held to 1e-5 against the XLA reference on bf16 pools.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention_reference import (
    LAYER,
    Case,
    Plan,
    _storage_np,
    build_step,
    edge_plans,
    plans,
    reference_output,
)

import pallas_kernels
from pallas_kernels import kv_write, ragged_paged_attention, reference
from pallas_kernels.metadata import AttentionMetadata

CASES = [
    # GQA ratio 1 / 4 / 8, head_dim 64 / 128, page 8 / 16 / 32
    Case(H=4, KV=4, Dh=64, page=8),
    Case(H=8, KV=2, Dh=128, page=16),
    Case(H=8, KV=1, Dh=64, page=32),
    # a group that is not a power of two (rows padded inside a block), small query blocks
    Case(H=6, KV=2, Dh=64, page=16, q_block=16),
    # sliding window (shorter and longer than a KV tile), soft cap, both
    Case(H=8, KV=2, Dh=64, page=16, window=20),
    Case(H=16, KV=2, Dh=128, page=8, cap=5.0),
    Case(H=4, KV=4, Dh=128, page=32, window=150, cap=3.0),
    # 2 pages per tile (the smallest Triton-legal tile at page 8), 16-token query blocks
    Case(H=8, KV=1, Dh=64, page=8, ppc=2, q_block=16, window=37),
    # decode-only and prefill-only steps
    Case(H=8, KV=2, Dh=64, page=16, D=8, Sp=0, Tq=0),
    Case(H=8, KV=2, Dh=64, page=8, D=0, Sp=4, Tq=64, window=24),
    # bfloat16 pools
    Case(H=8, KV=2, Dh=64, page=16, dtype="bfloat16"),
    Case(H=16, KV=2, Dh=128, page=8, dtype="bfloat16", window=30),
    Case(H=4, KV=4, Dh=64, page=32, dtype="bfloat16", cap=4.0),
]


@functools.cache
def step_fn(case: Case, splits: int | None = None):
    """One jitted step: both backends write the step's K/V, then attend (as the model does)."""
    kw = dict(
        scale=case.Dh**-0.5,
        sliding_window=case.window,
        soft_cap=case.cap,
        pages_per_chunk=case.ppc,
        q_block=case.q_block,
    )

    @jax.jit
    def run(k_pool, v_pool, layer, q, k_new, v_new, slot_pages, slot_offsets, meta):
        kp, vp = kv_write.write_kv(k_pool, v_pool, layer, k_new, v_new, slot_pages, slot_offsets)
        out = ragged_paged_attention.paged_attention(q, kp, vp, layer, meta, context_splits=splits, **kw)
        kx, vx = reference.write_kv(k_pool, v_pool, layer, k_new, v_new, slot_pages, slot_offsets)
        ref = reference.paged_attention(q, kx, vx, layer, meta, **kw)
        return out, ref, kp, vp

    return run


def check_step(case: Case, plan: Plan, seed: int, splits: int | None = None) -> None:
    step = build_step(case, plan, seed)
    out, ref, k_pool, v_pool = jax.device_get(
        step_fn(case, splits)(
            step.k_pool, step.v_pool, np.int32(LAYER), step.q, step.k_new, step.v_new,
            step.slot_pages, step.slot_offsets, step.meta,
        )
    )  # fmt: skip
    assert out.shape == (case.D + case.Tq, case.H, case.Dh) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # The KV-write kernel wrote exactly this step's slots.
    np.testing.assert_array_equal(k_pool, step.expected_k_pool)
    np.testing.assert_array_equal(v_pool, step.expected_v_pool)
    assert not np.any(out[step.padding_rows]), "padding rows must be zeros"
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5, err_msg=f"pallas vs xla, {plan}")
    exact = reference_output(case, step, round_kv=case.dtype == "bfloat16")
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-5, err_msg=f"pallas vs numpy, {plan}")
    if case.dtype == "bfloat16":
        truth = reference_output(case, step, round_kv=False)
        rel = np.abs(out - truth).max() / max(np.abs(truth).max(), 1e-30)
        assert rel <= 1e-2, f"bf16 pool: relative error {rel:.2e} > 1e-2, {plan}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_edge_steps(case: Case):
    """Lengths 1, exact page and tile boundaries, a long chunk ending at the table's end, padding."""
    for i, plan in enumerate(edge_plans(case)):
        check_step(case, plan, seed=i)


@pytest.mark.parametrize(
    ("case", "splits"),
    [(CASES[1], 3), (CASES[6], 2), (CASES[8], 5), (CASES[-2], 4)],
    ids=lambda x: str(x) if isinstance(x, Case) else f"splits{x}",
)
def test_edge_steps_context_split(case: Case, splits: int):
    """Decode rows split along the context (split-K, merged afterwards; what a GPU runs): parts that
    see no key (short contexts, sliding windows) must weigh nothing; 3 and 5 do not divide the tiles."""
    for i, plan in enumerate(edge_plans(case)):
        check_step(case, plan, seed=i, splits=splits)


def test_auto_context_splits():
    auto = ragged_paged_attention._auto_splits
    assert auto(32 * 8, 16) == 4  # 256 programs -> 1,024
    assert auto(8, 64) == ragged_paged_attention.MAX_SPLITS
    assert auto(8, 3) == 3  # never more parts than tiles
    assert auto(4096, 16) == 1


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:8:3] + CASES[-2:-1], ids=str)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_random_steps(case: Case, data, seed: int):
    """Random ragged mixes of decodes and prefill chunks (same compiled program as the edge steps)."""
    check_step(case, data.draw(plans(case), label="plan"), seed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_write_touches_exactly_the_given_slots(dtype):
    case = Case(H=4, KV=2, Dh=16, page=8, dtype=dtype)
    rng = np.random.default_rng(0)
    L, N, P, T = 3, 10, case.page, 24
    shape = (L, case.KV, N, P, case.Dh)
    write = jax.jit(kv_write.write_kv)
    for layer in range(L):
        k_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)
        v_pool = _storage_np(rng.normal(size=shape).astype(np.float32), case)
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


def test_kv_write_is_in_place_when_donated():
    shape = (2, 2, 16, 8, 64)
    k_pool, v_pool = jnp.zeros(shape), jnp.ones(shape)
    ptrs = (k_pool.unsafe_buffer_pointer(), v_pool.unsafe_buffer_pointer())
    new = jnp.full((4, 2, 64), 7.0)
    write = jax.jit(kv_write.write_kv, donate_argnums=(0, 1))
    k_out, v_out = write(
        k_pool, v_pool, np.int32(1), new, new, np.arange(4, dtype=np.int32), np.zeros(4, np.int32)
    )
    assert (k_out.unsafe_buffer_pointer(), v_out.unsafe_buffer_pointer()) == ptrs
    assert float(k_out[1, :, :4, 0].min()) == 7.0 and float(k_out.sum()) == 7.0 * 4 * 2 * 64


def test_registry():
    assert pallas_kernels.get_attention_backend("pallas") is ragged_paged_attention.paged_attention
    assert pallas_kernels.get_kv_writer("pallas") is kv_write.write_kv
    assert pallas_kernels.get_attention_backend("xla") is reference.paged_attention
    assert pallas_kernels.get_kv_writer("xla") is reference.write_kv


# ------------------------------------------------------------------------------------------------
# The GPU path, checked without a GPU: cross-lowering to Triton.
# ------------------------------------------------------------------------------------------------

_TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def verified_triton_modules(monkeypatch) -> list[bool] | None:
    """Run the MLIR verifier on every Triton module the lowering builds (Pallas itself does not),
    so that ill-typed Triton IR fails here rather than on a GPU. Uses a private jax hook: where it
    moved, the tests still check that lowering succeeds."""
    results: list[bool] = []
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return None
    original = lowering.lower_jaxpr_to_triton_module

    def verified(*args, **kwargs):
        out = original(*args, **kwargs)
        results.append(out.module.operation.verify())
        return out

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", verified)
    return results


def _lower_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "H,KV,Dh,page,dtype,window,cap",
    [
        (32, 8, 128, 16, jnp.float32, None, None),
        (8, 1, 64, 8, jnp.uint16, 100, 30.0),
        (12, 4, 64, 32, jnp.uint16, None, None),
    ],
)
def test_attention_lowers_to_triton(H, KV, Dh, page, dtype, window, cap, verified_triton_modules):
    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    D, Sp, Tq, W = 8, 3, 40, 8
    meta = AttentionMetadata(
        sd((D, W), i32),
        sd((D,), i32),
        sd((Sp, W), i32),
        sd((Sp,), i32),
        sd((Sp,), i32),
        sd((Sp,), i32),
        sd((), i32),
    )
    pool = sd((2, KV, 64, page, Dh), dtype)
    fn = functools.partial(
        ragged_paged_attention.paged_attention,
        scale=0.1,
        sliding_window=window,
        soft_cap=cap,
        interpret=False,
    )
    text = _lower_cuda(fn, sd((D + Tq, H, Dh), jnp.float32), pool, pool, sd((), i32), meta)
    assert text.count(_TRITON_CALL) == 2  # the decode and the prefill launch
    assert verified_triton_modules is None or verified_triton_modules == [True] * 2


def test_kv_write_lowers_to_triton_in_place(verified_triton_modules):
    sd = jax.ShapeDtypeStruct
    pool = sd((2, 8, 64, 16, 128), jnp.uint16)
    new = sd((24, 8, 128), jnp.float32)
    idx = sd((24,), jnp.int32)
    fn = functools.partial(kv_write.write_kv, interpret=False)
    text = _lower_cuda(fn, pool, pool, sd((), jnp.int32), new, new, idx, idx)
    assert text.count(_TRITON_CALL) == 1
    assert "output_operand_aliases" in text
    assert verified_triton_modules is None or verified_triton_modules == [True]


def test_triton_shape_limits_are_reported():
    case = Case(H=4, KV=2, Dh=64, page=4)
    step = build_step(case, Plan([3, 5, 0, 0], [(0, 3)]), 0)
    with pytest.raises(ValueError, match="pages_per_chunk \\* page_size >= 16"):
        ragged_paged_attention.paged_attention(
            step.q, step.k_pool, step.v_pool, LAYER, step.meta, scale=1.0, pages_per_chunk=2, interpret=False
        )


# ------------------------------------------------------------------------------------------------
# The engine: same greedy tokens and logits with either backend.
# ------------------------------------------------------------------------------------------------


def test_engine_greedy_identical_xla_vs_pallas(model_dir):
    """A 2-layer GQA Mistral with a sliding window (6) shorter than most prompts: chunked prefill, mixed
    steps, windowed attention, the KV-write kernel inside the layer scan (traced layer index)."""
    from pagedjax.testing.capture import run_capturing_logits, small_engine

    path = model_dir("mistral", sliding_window=6)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (1, 9, 21)]
    runs = {
        b: run_capturing_logits(small_engine(path, attention_backend=b), prompts, 5)
        for b in ("xla", "pallas")
    }
    xla, pallas = runs["xla"], runs["pallas"]
    assert xla.mixed_steps and pallas.mixed_steps, "decodes and prefill chunks shared a step"
    for rid_x, rid_p, prompt in zip(xla.request_ids, pallas.request_ids, prompts, strict=True):
        assert xla.outputs[rid_x] == pallas.outputs[rid_p]
        n = len(prompt) + 5 - 1
        np.testing.assert_allclose(
            pallas.logits_array(rid_p, n), xla.logits_array(rid_x, n), rtol=0, atol=1e-4
        )


def test_auto_backend_per_platform():
    """auto: Pallas on GPU only for Triton-friendly shapes, plain XLA on TPU (no Mosaic version)."""
    from pallas_kernels import resolve_backend

    assert resolve_backend("auto", "gpu", head_dim=128, page_size=16) == "pallas"
    assert resolve_backend("auto", "gpu", head_dim=80, page_size=16) == "xla"
    assert resolve_backend("auto", "tpu", head_dim=128, page_size=16) == "xla"
    assert resolve_backend("auto", "cpu") in ("cpu", "xla")
    assert resolve_backend("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("mosaic")


def test_triton_tiles_fit_shared_memory():
    """On a GPU, pages_per_chunk shrinks until one K (or V) tile fits MAX_TILE_BYTES: 4 pages of 32
    tokens x head_dim 128 in float32 asked an H100 for 264 KiB of shared memory (limit 227 KiB) and
    failed to launch. Tiles never shrink below Triton's 16-row minimum."""
    fit = ragged_paged_attention._fit_shared_memory
    assert fit(4, 32, 128, 4) == 2  # the case that failed on the H100
    assert fit(4, 16, 128, 4) == 4  # 32 KiB: fits
    assert fit(4, 32, 128, 2) == 4  # bfloat16 halves the bytes
    assert fit(8, 32, 256, 4) == 1
    assert fit(2, 8, 1024, 4) == 2  # 1 page of 8 rows would be below tl.dot's 16
    for ppc, page, dh, size in [(4, 32, 128, 4), (8, 16, 128, 4), (4, 8, 64, 2)]:
        got = fit(ppc, page, dh, size)
        assert got * page * dh * size <= ragged_paged_attention.MAX_TILE_BYTES and ppc % got == 0


def test_bench_attention_smoke(tmp_path):
    """experiments/bench_attention.py runs end to end (small heads, one repeat) and every backend it
    times agrees with the reference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[2] / "experiments" / "bench_attention.py"
    cmd = [sys.executable, str(script), "--heads", "4", "--kv-heads", "2", "--head-dim", "32"]
    cmd += ["--repeats", "1", "--pallas", "off", "--output-json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["chunked_ms"] > 0 and row["gather_all_ms"] > 0
        assert row["max_abs_diff"] < 1e-4, row
        if "cpu_ms" in row:  # the CPU kernel's bandwidth against the read bandwidth of the same run
            assert row["read_bandwidth_gb_per_s"] > 0
            want = 100 * row["cpu_kv_gb_per_s"] / row["read_bandwidth_gb_per_s"]
            assert abs(row["cpu_pct_of_read_bandwidth"] - want) < 1e-6 * max(1.0, want), row
