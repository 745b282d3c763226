"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as Flax `nnx` modules.

One call runs one engine step: a flat batch of tokens from many sequences (decodes and prefill
chunks together), writes their K/V into the global page pool, attends through the pool, and returns
logits only for the rows the sampler needs. The decoder layers' weights are stacked on a leading
"layers" axis and run under `lax.scan`: one traced layer body, so compiles stay short however deep
the model is.

The engine runs the module functionally (`pagedjax/models/functional.py`): the state is a plain
dict of arrays passed to `jax.jit`, bound to the module inside the traced step. Matmuls go through
`Linear` (float32 accumulation, XLA's dot or a packed-weight CPU kernel); the residual stream,
norms, RoPE and softmax stay in float32.

Another architecture subclasses `LlamaDecoderLayers` / `LlamaForCausalLM` where it differs (see
`qwen3.py` and docs/adding_a_model.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pagedjax.config import ModelConfig
from pagedjax.models.layers.attention import paged_attention
from pagedjax.models.layers.embedding import Embedding
from pagedjax.models.layers.linear import Linear
from pagedjax.models.layers.mlp import GatedMLP
from pagedjax.models.layers.norm import RMSNorm
from pagedjax.models.layers.rope import apply_rope, rotary_embeddings
from pagedjax.models.params import cast_state, hf_tensor, stack_layers
from pagedjax.models.step_inputs import AttentionOps, StepInputs


def gated_mlp_tensors(tensors: Mapping[str, np.ndarray], prefix: str) -> dict:
    """A gated MLP's weights under HF names `{prefix}gate_proj/up_proj/down_proj.weight`, in the
    `GatedMLP` state layout (gate and up fused into one [H, 2F] kernel)."""
    gate, up = hf_tensor(tensors, prefix + "gate_proj.weight"), hf_tensor(tensors, prefix + "up_proj.weight")
    return {
        "gate_up_proj": {"kernel": np.concatenate([gate, up]).T},
        "down_proj": {"kernel": hf_tensor(tensors, prefix + "down_proj.weight").T},
    }


@dataclass(frozen=True)
class LayerKind:
    """What may differ between the decoder layers of one model, as trace-time constants: the
    attention kernel's sliding window and which RoPE variant rotates q and k."""

    sliding_window: int | None
    rope: str  # a key of rope.rotary_embeddings(config)


def layer_kinds(config: ModelConfig) -> tuple[LayerKind, ...]:
    local = config.sliding_rope_theta is not None
    kinds = []
    for i in range(config.num_layers):
        window = config.layer_sliding_window(i)
        kinds.append(LayerKind(window, "local" if local and window is not None else "global"))
    return tuple(kinds)


def pattern_period(kinds: tuple[LayerKind, ...]) -> int:
    """The shortest p with kinds[i] == kinds[i % p] for every layer (1 for Llama, 2 for Gemma 2's
    sliding/global alternation, 6 for Gemma 3's five local layers per global one)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


class LlamaDecoderLayers(nnx.Module):
    """Every decoder layer at once: pre-norm attention and pre-norm SwiGLU MLP, weights stacked."""

    norm_offset = 0.0  # RMSNorm multiplies by offset + weight (Gemma: 1)

    def __init__(self, config: ModelConfig, dtype):
        c, L = config, config.num_layers
        self.config = c
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, num_layers=L, offset=self.norm_offset)
        qkv = c.q_size + 2 * c.kv_size
        self.qkv_proj = Linear(
            c.hidden_size, qkv, dtype, num_layers=L, use_bias=c.attention_bias, axes=("embed", "qkv")
        )
        self.o_proj = Linear(c.q_size, c.hidden_size, dtype, num_layers=L, axes=("heads", "embed"))
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, num_layers=L, offset=self.norm_offset)
        self.mlp = self.build_mlp(c, dtype)

    def build_mlp(self, c: ModelConfig, dtype):
        """The MLP block of every layer (MoE architectures return a `MoEBlock`)."""
        return GatedMLP(
            c.hidden_size, c.intermediate_size, dtype, num_layers=c.num_layers, activation=c.hidden_act
        )

    def project_qkv(self, x, layer, rows, cos, sin):
        """Normed hidden states -> rotated q [T, Hq, D], k [T, Hkv, D] and v [T, Hkv, D]."""
        c, T = self.config, x.shape[0]
        q, k, v = jnp.split(self.qkv_proj(x, layer, rows), [c.q_size, c.q_size + c.kv_size], axis=-1)
        q = apply_rope(q.reshape(T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(T, c.num_kv_heads, c.head_dim), cos, sin)
        return q, k, v.reshape(T, c.num_kv_heads, c.head_dim)

    def attention_half(
        self, h, k_cache, v_cache, layer, inputs: StepInputs, ops: AttentionOps, rope, kind: LayerKind
    ):
        """Norm, QKV, RoPE, K/V write and attention of every token: ([T, q_size], caches).
        `rope`: the (cos, sin) tables of this layer's RoPE variant."""
        c = self.config
        x = self.attn_norm(h, layer)
        q, k, v = self.project_qkv(x, layer, inputs.valid_rows, *rope)
        attn, k_cache, v_cache = paged_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            layer,
            inputs,
            ops,
            scale=c.attention_scale,
            sliding_window=kind.sliding_window,
            soft_cap=c.attn_logit_softcapping,
        )
        return attn.reshape(h.shape[0], c.q_size), k_cache, v_cache

    def output_half(self, h, attn, layer, valid_rows):
        """Output projection + residual, then the MLP block + residual."""
        h = h + self.o_proj(attn, layer, valid_rows)
        return h + self.mlp(self.mlp_norm(h, layer), layer, valid_rows)


class LlamaForCausalLM(nnx.Module):
    """Embedding, the stacked decoder layers, final norm and LM head (or the tied embedding)."""

    decoder_layers = LlamaDecoderLayers
    # Kernels holding a fused [gate | up] SwiGLU weight (see layers.linear.pack_params).
    swiglu_kernels: tuple[tuple[str, ...], ...] = (("layers", "mlp", "gate_up_proj", "kernel"),)

    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, lm_head: bool | None = None):
        """`lm_head`: give the model an explicit LM head (default: unless embeddings are tied; a
        tied model gets one when the CPU matmul kernel holds a packed copy of the embedding)."""
        c = config
        self.config = c
        self.embed = Embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = self.decoder_layers(c, dtype)
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=self.decoder_layers.norm_offset)
        if lm_head is None:
            lm_head = not c.tie_word_embeddings
        head = Linear(c.hidden_size, c.vocab_size, dtype, axes=("embed", "vocab")) if lm_head else None
        self.lm_head = nnx.data(head)

    # ------------------------------------------------------------------------------ the step
    def __call__(
        self, k_cache, v_cache, inputs: StepInputs, ops: AttentionOps, all_logits: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One step: (logits f32[S, V] at `logits_indices` — or [T, V] if all_logits —, caches)."""
        keep = None if all_logits else inputs.logits_indices
        h, k_cache, v_cache = self.hidden_states(k_cache, v_cache, inputs, ops, keep)
        return self.compute_logits(h, None if all_logits else inputs.logits_valid_rows), k_cache, v_cache

    def hidden_states(
        self, k_cache, v_cache, inputs: StepInputs, ops: AttentionOps, keep_rows=None, num_layers=None
    ):
        """Run all layers — or only the first `num_layers` (layer-skip drafting) — over the step's
        tokens. Returns (hidden f32, k_cache, v_cache).

        The hidden states are [T, H], or [len(keep_rows), H] for just the rows `keep_rows` when
        given: then the last layer still writes every token's K/V but runs its output projection
        and MLP only for those rows (a prefill chunk needs the last layer's residual stream only at
        its last token: ~7% fewer matmul FLOPs per prompt token on a 12-layer model)."""
        c, layers = self.config, self.layers
        L = c.num_layers if num_layers is None else num_layers
        kinds = layer_kinds(c)
        ropes = {name: r.tables(inputs.positions) for name, r in rotary_embeddings(c).items()}
        T = inputs.token_ids.shape[0]
        rows = inputs.valid_rows

        def run_layer(h, kc, vc, idx, kind: LayerKind, keep=None):
            attn, kc, vc = layers.attention_half(h, kc, vc, idx, inputs, ops, ropes[kind.rope], kind)
            if keep is not None:
                return layers.output_half(h[keep], attn[keep], idx, inputs.logits_valid_rows), kc, vc
            return layers.output_half(h, attn, idx, rows), kc, vc

        # Scan over groups of `period` layers (one traced group body); the layers after the last
        # whole group (and the pruned last layer) run unrolled.
        period = pattern_period(kinds)
        prune = keep_rows is not None and keep_rows.shape[0] < T
        num_groups = (L - 1) // period if prune else L // period

        def group(carry, g):
            h, kc, vc = carry
            for j in range(period):
                h, kc, vc = run_layer(h, kc, vc, g * period + j, kinds[j])
            return (h, kc, vc), None

        carry = (self.embed_tokens(inputs.token_ids), k_cache, v_cache)
        carry, _ = lax.scan(group, carry, jnp.arange(num_groups, dtype=jnp.int32))
        h, k_cache, v_cache = carry
        for i in range(num_groups * period, L):
            keep = keep_rows if prune and i == L - 1 else None
            h, k_cache, v_cache = run_layer(h, k_cache, v_cache, jnp.int32(i), kinds[i], keep)
        if keep_rows is not None and not prune:
            h = h[keep_rows]
        return h, k_cache, v_cache

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """The residual stream's start, f32 [T, H] (Gemma scales it)."""
        return self.embed(token_ids)

    def compute_logits(self, h: jax.Array, valid_rows: jax.Array | None = None) -> jax.Array:
        """Final norm + LM head (tied embeddings reuse the embedding matrix) -> float32 logits,
        soft-capped when the config says so (Gemma 2)."""
        x = self.final_norm(h)
        logits = self.lm_head(x, None, valid_rows) if self.lm_head is not None else self.embed.attend(x)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def layer_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        """Layer `i`'s weights from Hugging Face names, in this module's state layout (x @ W)."""
        p = f"model.layers.{i}."

        def get(name):
            return hf_tensor(tensors, p + name)

        out = {
            "attn_norm": {"scale": get("input_layernorm.weight")},
            "qkv_proj": {"kernel": cls.qkv_kernel(get)},
            "o_proj": {"kernel": get("self_attn.o_proj.weight").T},
            "mlp_norm": {"scale": get("post_attention_layernorm.weight")},
            "mlp": cls.mlp_tensors(tensors, config, i),
        }
        if config.attention_bias:
            out["qkv_proj"]["bias"] = np.concatenate([get(f"self_attn.{n}_proj.bias") for n in "qkv"])
        return out

    @classmethod
    def qkv_kernel(cls, get: Callable[[str], np.ndarray]) -> np.ndarray:
        """The fused [H, q + k + v] kernel from a layer's HF tensors (`get(name)`)."""
        return np.concatenate([get(f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0).T

    @classmethod
    def mlp_tensors(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, i: int) -> dict:
        """Layer `i`'s MLP weights: gate and up fused into one [H, 2F] kernel."""
        return gated_mlp_tensors(tensors, f"model.layers.{i}.mlp.")

    @classmethod
    def state_from_hf(cls, tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype) -> dict:
        """The module state (a nested dict of arrays) from Hugging Face-named tensors: the layers
        stacked, q/k/v and gate/up fused (fewer, larger matmuls), kernels and embedding in `dtype`,
        norm scales and biases float32."""
        state = {
            "embed": {"embedding": hf_tensor(tensors, "model.embed_tokens.weight")},
            "layers": stack_layers([cls.layer_tensors(tensors, config, i) for i in range(config.num_layers)]),
            "final_norm": {"scale": hf_tensor(tensors, "model.norm.weight")},
        }
        if not config.tie_word_embeddings:
            state["lm_head"] = {"kernel": hf_tensor(tensors, "lm_head.weight").T}
        return cast_state(state, dtype)
