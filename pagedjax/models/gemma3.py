"""Gemma 3 (text): Gemma 2's decoder plus Qwen3's RMSNorm over each head's q and k before RoPE
(with Gemma's 1 + w weights).

Differences that are config, not code: five sliding-window layers per global one
(`layer_types`), a RoPE base of its own for the sliding layers (`sliding_rope_theta`, with the
global layers' scaling in `rope_scaling`), and no soft caps by default. The class composes the two
parents (Python's method order: Gemma 2's norms and output half, Qwen3's q/k projection).
"""

from __future__ import annotations

from pagedjax.models.gemma2 import Gemma2DecoderLayers, Gemma2ForCausalLM
from pagedjax.models.qwen3 import Qwen3DecoderLayers, Qwen3ForCausalLM


class Gemma3DecoderLayers(Gemma2DecoderLayers, Qwen3DecoderLayers):
    pass


class Gemma3ForCausalLM(Gemma2ForCausalLM, Qwen3ForCausalLM):
    decoder_layers = Gemma3DecoderLayers
