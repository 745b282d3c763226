"""The MoE block's two expert paths (models/layers/moe.py) against a per-token numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.models.layers.moe import experts_dense, experts_grouped, route


def _reference(x, weights, experts, w_gate_up, w_down):
    """Token by token, expert by expert, in float64."""
    out = np.zeros(x.shape, np.float64)
    F = w_down.shape[1]
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t], strict=True):
            gu = x[t].astype(np.float64) @ w_gate_up[e]
            gate, up = gu[:F], gu[F:]
            out[t] += w * ((gate / (1 + np.exp(-gate))) * up) @ w_down[e]
    return out


def _case(T, E, k, H=32, F=24, seed=0, skew=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    if skew:  # every token prefers the same experts: one expert gets every token (several tiles)
        logits[:, 0] += 10.0
    w_gate_up = (rng.standard_normal((E, H, 2 * F)) / np.sqrt(H)).astype(np.float32)
    w_down = (rng.standard_normal((E, F, H)) / np.sqrt(F)).astype(np.float32)
    return x, logits, w_gate_up, w_down


@pytest.mark.parametrize(
    "T,E,k,skew",
    [
        (1, 8, 2, False),
        (5, 8, 2, False),
        (16, 8, 2, False),
        (37, 8, 3, False),
        (64, 4, 1, False),
        (50, 16, 4, True),
        (3, 64, 8, False),
    ],
)
def test_dense_and_grouped_match_reference(T, E, k, skew):
    x, logits, wgu, wd = _case(T, E, k, skew=skew)
    weights, experts = route(jnp.asarray(logits), k, normalize=True)
    want = _reference(x, np.asarray(weights), np.asarray(experts), wgu, wd)
    args = (jnp.asarray(x), weights, experts, jnp.asarray(wgu), jnp.asarray(wd))
    with jax.default_matmul_precision("highest"):
        dense = np.asarray(jax.jit(experts_dense)(*args))
        grouped = np.asarray(jax.jit(experts_grouped)(*args))
    np.testing.assert_allclose(dense, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(grouped, want, atol=1e-4, rtol=1e-4)


def test_grouped_with_small_tiles_crosses_tile_boundaries():
    x, logits, wgu, wd = _case(29, 4, 2, seed=3)
    weights, experts = route(jnp.asarray(logits), 2, normalize=False)
    want = _reference(x, np.asarray(weights), np.asarray(experts), wgu, wd)
    got = experts_grouped(jnp.asarray(x), weights, experts, jnp.asarray(wgu), jnp.asarray(wd), tile=4)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_route_softmax_top_k_and_renormalisation():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [3.0, -1.0, 0.5, 0.5]])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    w, e = route(logits, 2, normalize=False)
    np.testing.assert_array_equal(np.asarray(e), [[3, 2], [0, 2]])  # ties: the lower index first
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(probs, np.asarray(e), 1), rtol=1e-6)
    w_norm, _ = route(logits, 2, normalize=True)
    np.testing.assert_allclose(np.asarray(w_norm).sum(-1), 1.0, rtol=1e-6)
