"""Per-request sampling parameters with vLLM's defaults, normalisation and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy decoding (vLLM's ``_SAMPLING_EPS``).
SAMPLING_EPS = 1e-5
# Largest ``logprobs`` / ``prompt_logprobs`` a request may ask for.
MAX_LOGPROBS = 20


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Sampling parameters of one request, mirroring ``vllm.SamplingParams``.

    Normalisation done in ``__post_init__``: ``top_k=-1`` becomes ``0`` (disabled), ``stop`` and
    ``stop_token_ids`` become (copied) lists, ``logit_bias`` becomes a ``dict[int, float]`` copy.
    As in vLLM, a greedy request (``temperature < SAMPLING_EPS``) gets ``top_p=1``, ``top_k=0`` and
    ``min_p=0`` because those filters cannot change an argmax. Invalid values raise ``ValueError``
    whose message starts with the offending field's name.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = field(default=None)

    def __post_init__(self) -> None:
        # ---- normalisation -------------------------------------------------------------------
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop must not contain empty strings")

        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")

        if self.logit_bias is not None:
            bias: dict[int, float] = {}
            for k, v in dict(self.logit_bias).items():
                try:
                    tok = int(k)  # JSON clients send string keys
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if tok < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {tok}")
                if not _is_number(v):
                    raise ValueError(f"logit_bias values must be numbers, got {v!r} for token {tok}")
                bias[tok] = float(v)
            self.logit_bias = bias

        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0

        # ---- validation ----------------------------------------------------------------------
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            raise ValueError(f"best_of must be an int >= n ({self.n}), got {self.best_of!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.presence_penalty) or not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not _is_number(self.frequency_penalty) or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {v!r}")

        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.presence_penalty = float(self.presence_penalty)
        self.frequency_penalty = float(self.frequency_penalty)
        if self.greedy:
            # Like vLLM: filters are meaningless for argmax decoding.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """True for argmax decoding (``temperature < SAMPLING_EPS``)."""
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type_random(self) -> bool:
        return not self.greedy

    @property
    def num_sequences(self) -> int:
        """How many sequences are generated (``best_of`` if set, else ``n``)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (re-validated); list/dict fields are not shared."""
        return dataclasses.replace(self, **changes)


@dataclass
class BeamSearchParams:
    """Parameters of a beam-search request (vLLM's ``BeamSearchParams``)."""

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        self.length_penalty = float(self.length_penalty)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    def clone(self, **changes: Any) -> BeamSearchParams:
        return dataclasses.replace(self, **changes)
