"""Self-speculation by layer skipping: the target's first m layers, its final norm and LM head draft
k tokens greedily, sharing the target's weights and its KV pages for those layers. Works with any
model — the built-in one included, for which no smaller real sibling is installable here.

Drafting runs on the device after the step is scheduled (so the pages the drafts write are
allocated) and before the target verifies: `propose` only reserves k draft seats per request, which
sizes the scheduler's chunks, and `fill` computes the drafts of the chunks that got scheduled in one
jitted loop (`ModelRunner.draft_layer_skip`). The draft's K/V writes land on positions the
verification step recomputes, so what stays in the pool is always the target's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pagedjax.core.model_output import ModelOutput
from pagedjax.core.request import Request
from pagedjax.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from pagedjax.core.scheduler import SchedulerOutput

PLACEHOLDER = 0  # a reserved draft seat; `fill` replaces it before the step runs


class LayerSkipProposer(Proposer):
    drafts_after_scheduling = True

    def __init__(self, num_speculative_tokens: int, num_draft_layers: int):
        super().__init__(num_speculative_tokens)
        self.num_draft_layers = num_draft_layers

    def propose(self, requests: Sequence[Request], last_output: ModelOutput | None) -> dict[str, list[int]]:
        return {r.request_id: [PLACEHOLDER] * self.k for r in requests}

    def fill(self, sched_out: SchedulerOutput, runner, block_tables: dict[str, list[int]]) -> None:
        chunks = [ch for ch in sched_out.prefills if ch.num_spec_tokens]
        if not chunks:
            return
        drafts = runner.draft_layer_skip(chunks, block_tables, self.num_draft_layers, self.k)
        for ch, d in zip(chunks, drafts, strict=True):
            ch.request.spec_token_ids = d

    def warmup(self, runner, max_rows: int) -> None:
        runner.warmup_drafts(self.num_draft_layers, self.k, max_rows)


class DraftModelProposer(LayerSkipProposer):
    """A smaller model with the target's vocabulary drafts (`runner/draft_model.py`): the same
    reserve-then-fill flow as layer skip, its own weights and KV pool."""

    def __init__(self, num_speculative_tokens: int, draft_model):
        super().__init__(num_speculative_tokens, num_draft_layers=0)
        self.draft_model = draft_model

    def fill(self, sched_out: SchedulerOutput, runner, block_tables: dict[str, list[int]]) -> None:
        chunks = [ch for ch in sched_out.prefills if ch.num_spec_tokens]
        if not chunks:
            return
        for ch, d in zip(chunks, self.draft_model.draft(chunks, block_tables, self.k), strict=True):
            ch.request.spec_token_ids = d

    def warmup(self, runner, max_rows: int) -> None:
        self.draft_model.warmup(runner.buckets.all_shapes(), self.k, max_rows)
