"""The packed-weight XLA:CPU matmul kernel (pallas_kernels.cpu.packed_matmul) and its engine switch.

Against a float64 numpy product: row counts around the 6-row micro-kernel and the 96-row work item,
column counts around the 64-column panel, odd K; stacked per-layer weights read in place with a traced
layer index under jit and lax.scan; the portable (non-AVX-512) build; the fallback when the kernel is
unavailable; and the engine's greedy tokens and logits with matmul_backend "cpu" vs "xla".
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.models.layers.linear import pack_params, resolve_matmul_backend, unpack_params
from pallas_kernels import cpu as cpu_build
from pallas_kernels.cpu import packed_matmul as pm

pytestmark = pytest.mark.skipif(not pm.is_available(), reason=f"unavailable: {pm.unavailable_reason()}")


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("m", [1, 5, 6, 7, 64, 97, 200])
@pytest.mark.parametrize("k,n", [(1, 1), (33, 63), (64, 64), (37, 65), (768, 300)])
def test_matches_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    got = np.asarray(pm.packed_matmul(jnp.asarray(x), pm.pack_weight(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_pack_unpack_round_trip_and_shapes():
    rng = np.random.default_rng(0)
    w = _rand(rng, 3, 37, 130)  # stacked: [L, K, N]
    pw = pm.pack_weight(w)
    assert pw.data.shape == (3, 3, 37, 64) and pw.n == 130 and pw.shape == (3, 37, 130)
    np.testing.assert_array_equal(np.asarray(pm.unpack_weight(pw)), w)
    assert np.all(np.asarray(pw.data)[:, 2, :, 130 - 128 :] == 0), "panel padding is zero"


def test_stacked_weight_with_traced_layer_in_scan():
    """The kernel reads layer i of a [L, NB, K, 64] stack in place (no per-layer slice copies)."""
    rng = np.random.default_rng(1)
    L, m, k, n = 4, 13, 48, 70
    ws, x0 = _rand(rng, L, k, n) * 0.2, _rand(rng, m, k)
    proj = _rand(rng, n, k) * 0.2  # back to width k so layers chain
    pw = pm.pack_weight(ws)

    @jax.jit
    def run(x, pw):
        def body(h, i):
            return jnp.tanh(pm.packed_matmul(h, pw, i) @ proj), None

        return jax.lax.scan(body, x, jnp.arange(L, dtype=jnp.int32))[0]

    h = x0.astype(np.float64)
    for i in range(L):
        h = np.tanh((h @ ws[i].astype(np.float64)) @ proj.astype(np.float64))
    np.testing.assert_allclose(np.asarray(run(x0, pw)), h, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise():
    rng = np.random.default_rng(2)
    pw = pm.pack_weight(_rand(rng, 2, 16, 8))
    with pytest.raises(ValueError, match="layer index"):
        pm.packed_matmul(jnp.ones((3, 16)), pw)
    with pytest.raises(ValueError, match=r"x must be \[M, 16\]"):
        pm.packed_matmul(jnp.ones((3, 15)), pw, 0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_build_without_avx512():
    target = "pagedjax_cpu_packed_matmul_portable"
    flags = tuple(f for f in cpu_build.FLAGS if f != "-march=native") + ("-mno-avx512f",)
    lib = cpu_build.load(flags, target, source=pm.SOURCE, symbol=pm.SYMBOL)
    assert lib.pagedjax_cpu_matmul_has_avx512() == 0
    rng = np.random.default_rng(3)
    x, w = _rand(rng, 11, 40), _rand(rng, 40, 100)
    got = pm.packed_matmul(jnp.asarray(x), pm.pack_weight(w), _target=target)
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_backend_resolution(monkeypatch):
    from pallas_kernels.cpu import amx_matmul as amx

    def state(dtype):
        return {"layers": {"qkv_proj": {"kernel": jnp.zeros((1, 2, 2), dtype)}}}

    f32, bf16, f16 = state(jnp.float32), state(jnp.bfloat16), state(jnp.float16)
    assert resolve_matmul_backend("auto", f32, platform="cpu") == "cpu"
    # bfloat16 weights: the AMX kernel where this CPU has AMX, else XLA's dot.
    assert resolve_matmul_backend("auto", bf16, platform="cpu") == ("cpu" if amx.is_available() else "xla")
    assert resolve_matmul_backend("auto", f32, platform="gpu") == "xla"
    assert resolve_matmul_backend("auto", f16, platform="cpu") == "xla"
    assert resolve_matmul_backend("xla", f32) == "xla"
    with pytest.raises(ValueError, match="matmul_backend must be one of"):
        resolve_matmul_backend("mkl", f32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_matmul_backend("cpu", f16)
    # Unavailable kernel (no compiler, PAGEDJAX_CPU_MATMUL=0, no AMX ...): auto keeps XLA's dot, cpu says why.
    monkeypatch.setattr(pm, "_state", {"error": "CPU packed matmul unavailable: test"})
    monkeypatch.setattr(amx, "_state", {"error": "CPU AMX matmul unavailable: test"})
    assert resolve_matmul_backend("auto", f32, platform="cpu") == "xla"
    assert resolve_matmul_backend("auto", bf16, platform="cpu") == "xla"
    with pytest.raises(RuntimeError, match="unavailable: test"):
        resolve_matmul_backend("cpu", f32)
    with pytest.raises(RuntimeError, match="AMX matmul unavailable: test"):
        resolve_matmul_backend("cpu", bf16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pack_params_round_trip(model_dir, dtype):
    from pagedjax.models.loader import load_model
    from pallas_kernels.cpu import amx_matmul as amx

    if dtype == "bfloat16" and not amx.is_available():
        pytest.skip(f"AMX kernel unavailable: {amx.unavailable_reason()}")
    packed_type = amx.AmxPackedWeight if dtype == "bfloat16" else pm.PackedWeight
    for tie in (False, True):
        params = load_model(model_dir("llama", tie_word_embeddings=tie), dtype).params
        packed = pack_params(params)
        assert isinstance(packed["layers"]["mlp"]["down_proj"]["kernel"], packed_type)
        assert isinstance(packed["lm_head"]["kernel"], packed_type)  # tied: a packed copy of embed.T
        assert ("lm_head" in params) != tie
        back = unpack_params(packed, tie_word_embeddings=tie)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_engine_outputs_match_xla_dot(model_dir, variant, dtype):
    """Same weights, float32 accumulation on both paths: greedy tokens equal, logprobs close
    (bfloat16: the AMX kernel, whose MLP activation also runs inside the kernel)."""
    from pagedjax import LLM, SamplingParams
    from pallas_kernels.cpu import amx_matmul as amx

    if dtype == "bfloat16" and not amx.is_available():
        pytest.skip(f"AMX kernel unavailable: {amx.unavailable_reason()}")
    kw = dict(dtype=dtype, num_kv_pages=96, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
    prompts = ["the quick brown fox", "paged attention over a pool", "a"]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = {}
    for backend in ("xla", "cpu"):
        llm = LLM(model_dir(variant), matmul_backend=backend, **kw)
        assert llm.llm_engine.runner.matmul_backend == backend
        layers = llm.llm_engine.runner.params["layers"]
        if backend == "cpu" and dtype == "bfloat16":
            assert isinstance(layers["qkv_proj"]["kernel"], amx.AmxPackedWeight)
            assert layers["mlp"]["gate_up_proj"]["kernel"].swiglu
        runs[backend] = llm.generate(prompts, sp, use_tqdm=False)
    tol = 1e-4 if dtype == "float32" else 2e-3
    for a, b in zip(runs["xla"], runs["cpu"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            if dtype == "float32":
                assert la.keys() == lb.keys()
            for t in la.keys() & lb.keys():  # bf16: a near-tie in the top-3 may swap its third entry
                assert abs(la[t] - lb[t]) < tol


@pytest.mark.parametrize("rows", [(0, 5, 8, 20), (0, 0, 3, 3), (2, 2, 40, 97), (0, 97, 97, 97), (0, 0, 0, 0)])
def test_valid_rows_skip_padding(rows):
    """Rows outside [v0, v1) and [v2, v3) come back zero; the others are exact."""
    rng = np.random.default_rng(sum(rows))
    x, w = _rand(rng, 97, 40), _rand(rng, 40, 130)
    got = np.asarray(pm.packed_matmul(jnp.asarray(x), pm.pack_weight(w), None, jnp.asarray(rows)))
    want = x.astype(np.float64) @ w
    mask = np.zeros(97, bool)
    mask[rows[0] : rows[1]] = mask[rows[2] : rows[3]] = True
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-4)
    assert np.all(got[~mask] == 0)


def test_bench_matmul_script_runs(capsys, monkeypatch):
    """experiments/bench_matmul.py (README numbers) runs and prints its table."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "bench_matmul.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), "--rows", "3", "--shape", "32,2,1,16,48,100", "--repeats", "1"]
    )
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "| 3 | lm_head | 32 x 100 |" in out and "all rows:" in out


def test_float32_dots_ask_for_full_precision():
    """XLA's default precision for float32 dots on a GPU is a reduced TF32/bf16 pass (~1e-3 off on an
    H100, which broke the float32 HF-parity tests there): float32 weights ask for HIGHEST, bf16
    weights keep the default; the attention reference's einsums ask for HIGHEST too."""
    from pagedjax.models.layers.embedding import Embedding
    from pagedjax.models.layers.linear import linear
    from pallas_kernels import reference

    def tied_head(x, w):
        table = Embedding(w.shape[1], w.shape[0], w.dtype)
        table.embedding.set_value(w.T)
        return table.attend(x)

    x = jnp.ones((4, 8), jnp.float32)
    for dtype, want in ((jnp.float32, "HIGHEST"), (jnp.bfloat16, None)):
        w = jnp.ones((8, 16), dtype)
        for fn in (lambda x, w: linear(x, w), tied_head):
            eqns = [e for e in jax.make_jaxpr(fn)(x, w).eqns if e.primitive.name == "dot_general"]
            assert eqns, "no dot_general traced"
            precision = eqns[0].params["precision"]
            if want is None:
                assert precision is None or all(p == jax.lax.Precision.DEFAULT for p in precision)
            else:
                assert precision is not None and all(p == jax.lax.Precision.HIGHEST for p in precision)
    eqns = [
        e
        for e in jax.make_jaxpr(lambda a, b: reference._einsum("ij,jk->ik", a, b))(x, x.T).eqns
        if e.primitive.name == "dot_general"
    ]
    assert all(p == jax.lax.Precision.HIGHEST for p in eqns[0].params["precision"])
