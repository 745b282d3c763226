"""The AMX bf16 matmul kernel (pallas_kernels.cpu.amx_matmul) and the engine on it.

Against a float64 numpy product of the bf16-rounded operands (the kernel sums exact bf16 products
in float32): row counts around the 16-row tile, the 32-row tile pair and the 128-row work item,
column counts around the 16-column panel and the panel pair, K not a multiple of 32 (padded);
`valid_rows` leaving padding rows zero; stacked per-layer weights read in place with a traced layer
index under lax.scan; the pack/unpack round trip; the fused SwiGLU output. (pack_params and the
engine's bf16 tokens with this kernel vs XLA's dot: tests/test_cpu_matmul.py.) Both of the
kernel's paths: AMX tiles, and AVX-512 BF16 dot products (forced on an AMX machine; the only path
on e.g. AMD Zen 4). Skipped where the CPU has neither.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu import amx_matmul as amx

pytestmark = pytest.mark.skipif(not amx.is_available(), reason=f"unavailable: {amx.unavailable_reason()}")

# Where AMX runs, every test also runs on the AVX-512 BF16 path (forced), so both paths are checked
# on an AMX machine; elsewhere the one path there is.
_PATHS = ["default", *(["avx512_bf16"] if amx.is_available() and amx.kernel_name() == "amx" else [])]


@pytest.fixture(autouse=True, params=_PATHS)
def kernel_path(request):
    if request.param != "default":
        amx.force_dot_path(True)
    yield request.param
    if request.param != "default":
        amx.force_dot_path(False)


def _bf16(rng, *shape) -> np.ndarray:
    """Random values already on the bf16 grid (as float32), so the reference is exact."""
    x = rng.standard_normal(shape).astype(np.float32)
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)


@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 64, 129, 300])
@pytest.mark.parametrize("k,n", [(32, 16), (64, 17), (50, 48), (768, 300), (96, 1)])
def test_matches_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = _bf16(rng, m, k), _bf16(rng, k, n)
    got = np.asarray(amx.amx_matmul(jnp.asarray(x), amx.pack_weight_bf16(w)))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_valid_rows_compute_only_those_rows():
    rng = np.random.default_rng(5)
    m, k, n = 70, 64, 40
    x, w = _bf16(rng, m, k), _bf16(rng, k, n)
    rows = jnp.asarray([3, 21, 40, 67], jnp.int32)
    got = np.asarray(jax.jit(amx.amx_matmul)(jnp.asarray(x), amx.pack_weight_bf16(w), None, rows))
    valid = np.zeros(m, bool)
    valid[3:21] = valid[40:67] = True
    np.testing.assert_allclose(got[valid], _reference(x, w)[valid], rtol=1e-5, atol=1e-4)
    assert np.all(got[~valid] == 0), "padding rows are zero"


def test_pack_unpack_round_trip_and_layout():
    rng = np.random.default_rng(0)
    w = _bf16(rng, 3, 37, 40)  # stacked [L, K, N]; K padded to 64, N to 48
    pw = amx.pack_weight_bf16(w)
    assert pw.data.shape == (3, 3, 32, 32) and pw.shape == (3, 37, 40) and pw.data.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(amx.unpack_weight_bf16(pw).astype(jnp.float32)), w)
    data = np.asarray(pw.data.astype(jnp.float32))
    # Element [l, b, p, 2c + e] = w[l, 2p + e, 16b + c]: the tile pair layout.
    assert data[1, 2, 5, 2 * 3 + 1] == w[1, 11, 35]
    assert np.all(data[:, 2, :, 2 * 8 :] == 0), "columns past N are zero"
    assert np.all(data[:, :, 19:, :] == 0), "K rows past 37 are zero"


def test_stacked_weight_with_traced_layer_in_scan():
    rng = np.random.default_rng(1)
    L, m, k, n = 4, 20, 64, 70
    ws, x0 = _bf16(rng, L, k, n) * 0.25, _bf16(rng, m, k)
    proj = _bf16(rng, n, k) * 0.25
    pw = amx.pack_weight_bf16(ws)

    @jax.jit
    def run(x, pw):
        def body(h, i):
            y = amx.amx_matmul(h, pw, i)
            return jnp.tanh(y.astype(jnp.bfloat16).astype(jnp.float32) @ proj), y

        return jax.lax.scan(body, x, jnp.arange(L, dtype=jnp.int32))[1]

    ys = np.asarray(run(x0, pw))
    h = x0
    for i in range(L):  # replay with the kernel's own layer outputs: checks layer i reads weight i
        hb = np.asarray(jnp.asarray(h, jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_allclose(ys[i], _reference(hb, ws[i]), rtol=1e-4, atol=1e-4)
        h = np.tanh(np.asarray(jnp.asarray(ys[i], jnp.bfloat16).astype(jnp.float32)) @ proj)


@pytest.mark.parametrize("m,k,f", [(1, 32, 16), (17, 50, 48), (40, 96, 32), (130, 256, 80)])
def test_swiglu_epilogue_matches_numpy(m, k, f):
    """A [gate | up] weight packed with swiglu=True returns bf16(silu(x @ gate) * (x @ up))."""
    rng = np.random.default_rng(m + k + f)
    x, w = _bf16(rng, m, k), _bf16(rng, k, 2 * f) * 0.25  # a power of two keeps the bf16 grid
    pw = amx.pack_weight_bf16(w, swiglu=True)
    np.testing.assert_array_equal(np.asarray(amx.unpack_weight_bf16(pw).astype(jnp.float32)), w)
    rows = jnp.asarray([0, m - m // 3, m - m // 3, m], jnp.int32)  # all rows, split in two ranges
    got = amx.amx_matmul(jnp.asarray(x), pw, None, rows)
    assert got.shape == (m, f) and got.dtype == jnp.bfloat16
    y = _reference(x, w)
    gate, up = y[:, :f], y[:, f:]
    want = gate / (1 + np.exp(-gate)) * up
    # float32 math, then one bf16 rounding (relative 2^-9) of the result
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2**-8, atol=1e-5)
    padded = amx.amx_matmul(jnp.asarray(x), pw, None, jnp.asarray([1, m, m, m], jnp.int32))
    assert np.all(np.asarray(padded.astype(jnp.float32))[0] == 0), "padding rows are zero"
    with pytest.raises(ValueError, match="swiglu packing"):
        amx.pack_weight_bf16(w[:, :-16] if f > 16 else w[:, :24], swiglu=True)


def test_bad_inputs_raise():
    pw = amx.pack_weight_bf16(np.ones((2, 32, 16), np.float32))
    with pytest.raises(ValueError, match="layer index"):
        amx.amx_matmul(jnp.ones((3, 32)), pw)
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        amx.amx_matmul(jnp.ones((3, 31)), pw, 0)


def test_bench_matmul_script_runs_bf16(capsys, monkeypatch):
    """experiments/bench_matmul.py --dtype bfloat16 (README numbers: XLA's bf16 dot vs this kernel)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "bench_matmul.py"
    argv = [str(script), "--rows", "3", "--shape", "32,2,1,16,48,100", "--repeats", "1"]
    argv += ["--dtype", "bfloat16"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "bfloat16" in out and "| 3 | lm_head | 32 x 100 |" in out and "all rows:" in out
