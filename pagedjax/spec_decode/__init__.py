"""Speculative decoding: proposers of draft tokens, their exact verification, and its counters.

The scheduler treats a request's drafts as tokens to compute (`Request.spec_token_ids`); the runner
scores them in the ordinary ragged step; `verify.verified_tokens` keeps the accepted prefix.
"""

from pagedjax.spec_decode.config import SpeculativeConfig
from pagedjax.spec_decode.layer_skip import DraftModelProposer, LayerSkipProposer
from pagedjax.spec_decode.metrics import SpecDecodeMetrics
from pagedjax.spec_decode.ngram import NgramProposer
from pagedjax.spec_decode.proposer import Proposer

__all__ = [
    "LayerSkipProposer",
    "NgramProposer",
    "Proposer",
    "SpecDecodeMetrics",
    "SpeculativeConfig",
    "make_proposer",
]


def make_proposer(config: SpeculativeConfig, draft_model=None) -> Proposer:
    """The proposer of `config`; `draft_model` (runner/draft_model.py) for method draft_model."""
    if config.method == "draft_model":
        return DraftModelProposer(config.num_speculative_tokens, draft_model)
    if config.method == "ngram":
        return NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
    if config.method == "layer_skip":
        return LayerSkipProposer(config.num_speculative_tokens, config.num_draft_layers)
    raise ValueError(f"no proposer for method {config.method!r}")
