"""The CPU top-k kernel returns exactly `lax.top_k`'s values (the sampler's candidates)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pallas_kernels.cpu as cpu_kernels
from pallas_kernels.cpu import top_k as cpu_top_k

# Skipped only where no CPU kernel builds at all (no compiler, not x86-64 Linux...): where the
# attention kernel builds, this one must too, so a broken build fails here instead of hiding.
pytestmark = pytest.mark.skipif(not cpu_kernels.is_available(), reason="CPU kernels do not build here")


def test_kernel_builds_where_the_attention_kernel_does():
    assert cpu_top_k.is_available(), cpu_top_k._state.get("error")


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 1000), (37, 4099)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_lax_top_k(shape, ties):
    rng = np.random.default_rng(shape[1])
    x = rng.normal(size=shape).astype(np.float32) * 3
    if ties:
        x = np.round(x).astype(np.float32)
    for k in sorted({1, min(5, shape[1]), min(16, shape[1]), min(256, shape[1]), shape[1]}):
        got = jax.jit(lambda x, k=k: cpu_top_k.top_k_values(x, k))(jnp.asarray(x))
        _same_bits(got, lax.top_k(jnp.asarray(x), k)[0])


def test_special_values_and_adversarial_order():
    """NaNs, infinities and signed zeros in lax.top_k's total order; rows in ascending order (every
    value beats the smallest kept so far) and in descending order."""
    special = np.array([1.0, np.nan, -np.inf, 0.0, -0.0, np.inf, -np.nan, 2.0, -3.5], np.float32)
    rows = np.stack(
        [
            np.tile(special, 7)[:60],
            np.arange(60, dtype=np.float32),
            -np.arange(60, dtype=np.float32),
            np.full(60, -np.inf, np.float32),
        ]
    )
    for k in (1, 9, 31, 60):
        _same_bits(cpu_top_k.top_k_values(jnp.asarray(rows), k), lax.top_k(jnp.asarray(rows), k)[0])


def test_bad_arguments():
    x = jnp.zeros((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="k"):
        cpu_top_k.top_k_values(x, 0)
    with pytest.raises(ValueError, match="k"):
        cpu_top_k.top_k_values(x, 9)
    with pytest.raises(ValueError, match=r"\[S, V\]"):
        cpu_top_k.top_k_values(jnp.zeros((8,), jnp.float32), 2)


def test_falls_back_to_lax_where_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_top_k, "is_available", lambda: False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32))
    lowered = jax.jit(lambda x: cpu_top_k.top_k_values(x, 7)).lower(x).as_text()
    assert cpu_top_k.TARGET not in lowered
    _same_bits(cpu_top_k.top_k_values(x, 7), lax.top_k(x, 7)[0])
