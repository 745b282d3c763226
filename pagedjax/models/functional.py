"""Run an `nnx` model as a pure function of a plain state dict, under a plain `jax.jit`.

The engine keeps a model's weights as a nested dict of arrays (what `state_from_hf` builds and
orbax checkpoints hold) and passes it to the jitted step. Inside the trace, `bind` builds the module
abstractly (`nnx.eval_shape`: no weights allocated), splits it once into a graph definition and an
abstract state, puts the dict's arrays into that state and merges the two. That costs trace time
only: the compiled step is the same program a hand-written function over the dict would be, and
each call pays `jax.jit`'s dispatch of a dict (µs), not `nnx.jit`'s graph traversal (measured here
at 1.5 ms per call).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pagedjax.config import ModelConfig
from pagedjax.models.step_inputs import AttentionOps, StepInputs
from pallas_kernels import write_kv


def bind(model_cls: type[nnx.Module], config: ModelConfig, state: dict) -> nnx.Module:
    """The module `model_cls(config)` holding the arrays of `state` (call inside a trace or not)."""
    dtype = state["embed"]["embedding"].dtype
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype, lm_head="lm_head" in state))
    graphdef, abstract_state = nnx.split(abstract)
    nnx.replace_by_pure_dict(abstract_state, state)
    missing = [
        "/".join(map(str, path))
        for path, var in nnx.to_flat_state(abstract_state)
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if missing:
        raise KeyError(f"model state lacks {', '.join(missing[:8])}")
    return nnx.merge(graphdef, abstract_state)


def make_forward(model_cls: type[nnx.Module]) -> Callable:
    """forward(params, config, k_cache, v_cache, inputs, attention_fn, all_logits, write_kv_fn,
    fused_attention_fn) -> (logits, k_cache, v_cache): the step function the runner jits."""

    def forward(
        params: dict,
        config: ModelConfig,
        k_cache,
        v_cache,
        inputs: StepInputs,
        attention_fn: Callable,
        all_logits: bool = False,
        write_kv_fn: Callable = write_kv,
        fused_attention_fn: Callable | None = None,
    ):
        model = bind(model_cls, config, params)
        ops = AttentionOps(attention_fn, write_kv_fn, fused_attention_fn)
        return model(k_cache, v_cache, inputs, ops, all_logits)

    forward.__name__ = f"{model_cls.__name__}_forward"
    return forward


def make_layer_skip_draft(model_cls: type[nnx.Module]) -> Callable:
    """draft(params, config, k_cache, v_cache, tokens, positions, tables, num_drafts, ops, *,
    num_layers, num_tokens, page_size) -> (drafts i32[D, num_tokens], k_cache, v_cache).

    Self-speculation: the model's first `num_layers` layers, final norm and LM head propose
    `num_tokens` greedy tokens per row, one decode-shaped pass per token, all in one jitted call (no
    host round trip between drafts). Row r starts from `tokens[r]` at `positions[r]` and writes K/V
    of the first `num_layers` layers into the target's own pages for positions
    `positions[r] .. positions[r] + num_drafts[r] - 1` (writes past that are dropped); the target's
    verification step covers those positions and overwrites them with its own values.
    """

    def draft(
        params,
        config,
        k_cache,
        v_cache,
        tokens,
        positions,
        tables,
        num_drafts,
        ops,
        *,
        num_layers: int,
        num_tokens: int,
        page_size: int,
    ):
        from pallas_kernels import AttentionMetadata

        model = bind(model_cls, config, params)
        D, P = tables.shape
        num_pages = k_cache.shape[2]
        num_live = jnp.sum(num_drafts > 0).astype(jnp.int32)  # live rows come first
        none = jnp.zeros((0, P), jnp.int32)
        empty = jnp.zeros((0,), jnp.int32)

        def one_token(carry, i):
            tok, kc, vc = carry
            pos = positions + i
            live = i < num_drafts
            page = jnp.take_along_axis(tables, jnp.minimum(pos // page_size, P - 1)[:, None], axis=1)[:, 0]
            meta = AttentionMetadata(
                tables, jnp.where(live, pos + 1, 0), none, empty, empty, empty, jnp.int32(0)
            )
            inputs = StepInputs(
                tok,
                pos,
                jnp.where(live, page, num_pages),  # out of range: the write is dropped
                pos % page_size,
                jnp.arange(D, dtype=jnp.int32),
                meta,
                jnp.stack([jnp.int32(0), num_live, jnp.int32(D), jnp.int32(D)]),
            )
            h, kc, vc = model.hidden_states(kc, vc, inputs, ops, num_layers=num_layers)
            nxt = jnp.argmax(model.compute_logits(h), axis=-1).astype(jnp.int32)
            return (nxt, kc, vc), nxt

        # Unrolled over the k drafts (k is small): a `lax.scan` carrying the page pool made XLA:CPU
        # copy the pool every iteration (measured 50 ms vs ~15 ms for 3 drafts on the built-in
        # model); unrolled, each pass updates the donated pool in place like a model step.
        carry, drafts = (tokens, k_cache, v_cache), []
        for i in range(num_tokens):
            carry, nxt = one_token(carry, jnp.int32(i))
            drafts.append(nxt)
        _, k_cache, v_cache = carry
        return jnp.stack(drafts, axis=1), k_cache, v_cache

    draft.__name__ = f"{model_cls.__name__}_layer_skip_draft"
    return draft
