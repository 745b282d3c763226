"""Mixture-of-experts MLP block: a top-k softmax router and gated-MLP experts (Mixtral, Qwen3-MoE).

The experts' weights are stacked, [E, H, 2F] (fused gate | up) and [E, F, H], with the expert axis
a logical axis ("expert") that a mesh can shard. Two ways to run them, both without per-token
Python and both exact:

- `experts_dense`: every token through every expert, weighted by its (mostly zero) router weights:
  one einsum, E / k times the FLOPs, but no data movement. Wins on CPU up to ~256 tokens.
- `experts_grouped`: the (token, expert) pairs sorted by expert and cut into row tiles of one
  expert each (each expert's rows padded to whole tiles), then one loop over the tiles that exist,
  each a [tile, H] x [H, 2F] matmul on that expert's weights. FLOPs ~ the routed ones; each used
  expert's weights are read once per tile. Wins for large steps (long prefill chunks).

`MoEBlock` picks by the (static) token count; experiments/bench_moe.py measured the crossover.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pagedjax.models.layers.linear import float32_precision
from pagedjax.models.layers.mlp import GatedMLP

# Rows per expert tile of the grouped path, and the step token count up to which the dense path
# runs. Measured by experiments/bench_moe.py (bf16, 2 cores, 2026-12-07): on XLA:CPU the grouped
# loop (one small matmul per tile, each re-reading its expert's weights) loses to the one dense
# einsum from 2 up to 256 tokens on both an Intel Xeon (AMX) and an AMD Zen 4 — 0.45-0.6x the
# time for Mixtral-like 8 experts, 0.6-0.95x for Qwen3-MoE-like 128 — and only wins beyond
# (E / k times the FLOPs catch up). Engine steps have at least 8 rows.
GROUP_TILE = 16
DENSE_MAX_TOKENS = 256


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts (float32), the top k, optionally renormalised to sum to 1.
    Returns (weights f32 [T, k], expert ids i32 [T, k])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(
        x.astype(w.dtype), w, precision=float32_precision(w.dtype), preferred_element_type=jnp.float32
    )


def _expert_mlp(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    gate, up = jnp.split(_dot(x, w_gate_up), 2, axis=-1)
    return _dot(jax.nn.silu(gate) * up, w_down)


def experts_dense(x, weights, experts, w_gate_up, w_down) -> jax.Array:
    """x f32 [T, H], router (weights, experts) [T, k] -> f32 [T, H], all experts on all tokens."""
    E = w_gate_up.shape[0]
    combine = jnp.zeros((x.shape[0], E), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)  # [T, E]
    gate, up = jnp.split(
        jnp.einsum(
            "th,ehf->etf",
            x.astype(w_gate_up.dtype),
            w_gate_up,
            precision=float32_precision(w_gate_up.dtype),
            preferred_element_type=jnp.float32,
        ),
        2,
        axis=-1,
    )
    out = jnp.einsum(
        "etf,efh->eth",
        (jax.nn.silu(gate) * up).astype(w_down.dtype),
        w_down,
        precision=float32_precision(w_down.dtype),
        preferred_element_type=jnp.float32,
    )
    return jnp.einsum("te,eth->th", combine, out)


def experts_grouped(x, weights, experts, w_gate_up, w_down, tile: int = GROUP_TILE) -> jax.Array:
    """Same result as `experts_dense`, computing only the routed (token, expert) pairs."""
    T, H = x.shape
    E = w_gate_up.shape[0]
    k = experts.shape[1]
    P = T * k
    flat = experts.reshape(P)
    order = jnp.argsort(flat, stable=True)  # pair ids grouped by expert
    counts = jnp.bincount(flat, length=E)
    group_start = jnp.cumsum(counts) - counts
    tiles = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    # Where each sorted pair lands in the padded, tiled row space.
    sorted_expert = flat[order]
    rank = jnp.arange(P, dtype=jnp.int32) - group_start[sorted_expert]
    slot = tile_start[sorted_expert] * tile + rank
    max_tiles = -(-P // tile) + min(E, P)  # static bound: every used expert adds < 1 tile of padding
    rows = max_tiles * tile
    src = jnp.full((rows,), P, jnp.int32).at[slot].set(order.astype(jnp.int32))  # P: a padding row
    token = jnp.where(src < P, src // k, T)
    xs = jnp.concatenate([x, jnp.zeros((1, H), x.dtype)])[token].reshape(max_tiles, tile, H)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(max_tiles), side="right"), E - 1)

    def body(t, out):
        e = tile_expert[t]
        wgu = lax.dynamic_index_in_dim(w_gate_up, e, keepdims=False)
        wd = lax.dynamic_index_in_dim(w_down, e, keepdims=False)
        return lax.dynamic_update_index_in_dim(out, _expert_mlp(xs[t], wgu, wd), t, axis=0)

    out = lax.fori_loop(0, tile_end[-1], body, jnp.zeros((max_tiles, tile, H), jnp.float32))
    out = out.reshape(rows, H)
    pair_out = jnp.zeros((P, H), jnp.float32).at[order].set(out[slot])  # back to (token, k) order
    return jnp.einsum("tk,tkh->th", weights, pair_out.reshape(T, k, H))


class MoEBlock(nnx.Module):
    """Router + experts, stacked over `num_layers` like every other layer weight; optionally a
    shared expert (Qwen2-MoE) that every token goes through, scaled by sigmoid(x @ w_gate)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        dtype,
        *,
        num_layers: int,
        normalize: bool = True,
        shared_hidden: int = 0,
    ):
        L, E = num_layers, num_experts
        self.top_k, self.normalize = top_k, normalize
        # The router stays float32 and off the packed-kernel path (it is tiny, and its N is E).
        self.router = nnx.Param(jnp.zeros((L, dim, E), jnp.float32), logical_axes=("layers", "embed", None))
        self.experts_gate_up = nnx.Param(
            jnp.zeros((L, E, dim, 2 * hidden), dtype), logical_axes=("layers", "expert", "embed", "mlp")
        )
        self.experts_down = nnx.Param(
            jnp.zeros((L, E, hidden, dim), dtype), logical_axes=("layers", "expert", "mlp", "embed")
        )
        # The shared expert is an ordinary gated MLP: its projections take the Linear hooks.
        shared, shared_gate = None, None
        if shared_hidden:
            shared = GatedMLP(dim, shared_hidden, dtype, num_layers=L)
            gate = jnp.zeros((L, dim, 1), jnp.float32)
            shared_gate = nnx.Param(gate, logical_axes=("layers", "embed", None))
        self.shared_expert = nnx.data(shared)
        self.shared_expert_gate = nnx.data(shared_gate)

    def __call__(self, x: jax.Array, layer: jax.Array, valid_rows=None, *, grouped: bool | None = None):
        def pick(p):
            return lax.dynamic_index_in_dim(p.get_value(), layer, keepdims=False)

        x_in, x = x, x.astype(jnp.float32)
        logits = jnp.dot(x, pick(self.router), precision=lax.Precision.HIGHEST)
        weights, experts = route(logits, self.top_k, self.normalize)
        if grouped is None:
            grouped = x.shape[0] > DENSE_MAX_TOKENS
        run = experts_grouped if grouped else experts_dense
        out = run(x, weights, experts, pick(self.experts_gate_up), pick(self.experts_down))
        if self.shared_expert is not None:
            scale = jax.nn.sigmoid(jnp.dot(x, pick(self.shared_expert_gate), precision=lax.Precision.HIGHEST))
            out = out + scale * self.shared_expert(x_in, layer, valid_rows).astype(jnp.float32)
        return out
