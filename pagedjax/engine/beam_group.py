"""One beam-search request inside the engine: its selection state and the live beam sequences.

Each live beam is an ordinary scheduler `Request` with `hold_samples=True`: the engine computes its
tokens like any other sequence, but instead of appending the sampled token it parks the step's top-K
logprobs on the request. Once every live beam has them, `advance` runs the HF-faithful selection
(sampling/beam_search.py) and replaces the beams by forks of their chosen sources: a fork shares all
of its source's pages, and copy-on-write gives it a private copy of the partially filled page at the
divergence point when it first writes there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedjax.core.request import Request, RequestStatus
from pagedjax.core.scheduler import Scheduler
from pagedjax.outputs import CompletionOutput
from pagedjax.sampling.beam_search import BeamSearchState
from pagedjax.sampling_params import BeamSearchParams


@dataclass
class BeamGroup:
    request_id: str
    params: BeamSearchParams
    state: BeamSearchState
    beams: list[Request]  # live beams, aligned with state.running
    _next_id: int = 0
    extra: dict = field(default_factory=dict)

    def beam_id(self) -> str:
        self._next_id += 1
        return f"{self.request_id}#beam{self._next_id}"

    @property
    def ready(self) -> bool:
        """Every live beam has its next-token logprobs."""
        return all(b.held_logprobs is not None for b in self.beams)

    def advance(self, scheduler: Scheduler) -> bool:
        """Pick the next beams (forking their pages) and retire the old ones. True when done."""
        choices = self.state.step([b.held_logprobs for b in self.beams])
        new_beams = []
        for src, token in choices:
            source = self.beams[src]
            beam = Request(
                self.beam_id(),
                source.prompt_token_ids,
                source.sampling_params,
                seed=0,
                max_tokens=source.max_tokens,
                arrival_time=source.arrival_time,
                eos_token_ids=source.eos_token_ids,
                output_token_ids=source.output_token_ids + [token],
                cache_salt=source.cache_salt,
                hold_samples=True,
            )
            beam.num_cached_tokens = source.num_cached_tokens
            scheduler.fork_request(source, beam)
            new_beams.append(beam)
        for old in self.beams:
            scheduler.finish(old, RequestStatus.FINISHED_STOPPED)
        self.beams = new_beams
        return self.state.done

    def outputs(self, tokenizer) -> list[CompletionOutput]:
        outs = []
        for i, hyp in enumerate(self.state.best()):
            ends_with_eos = bool(hyp.token_ids) and hyp.token_ids[-1] in self.state.eos_token_ids
            outs.append(
                CompletionOutput(
                    index=i,
                    text=tokenizer.decode(hyp.token_ids, skip_special_tokens=True),
                    token_ids=list(hyp.token_ids),
                    cumulative_logprob=hyp.cumulative_logprob,
                    finish_reason="stop" if ends_with_eos else "length",
                )
            )
        return outs
