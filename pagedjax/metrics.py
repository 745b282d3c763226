"""Engine counters and per-step statistics (KV usage and waste, throughput), kept on the host.

The server exports these in Prometheus format; `LLM.get_metrics()` returns them as a dict.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVCacheStats:
    """Page-pool occupancy at one moment (the KV cache manager fills it; metrics keep it)."""

    num_pages: int
    pages_used: int
    pages_free: int
    allocated_slots: int
    filled_slots: int
    pages_cached: int = 0

    @property
    def usage(self) -> float:
        return self.pages_used / self.num_pages

    @property
    def waste(self) -> float:
        """Allocated-but-unfilled token slots / allocated slots (internal fragmentation)."""
        return 0.0 if self.allocated_slots == 0 else 1.0 - self.filled_slots / self.allocated_slots


@dataclass
class EngineMetrics:
    num_requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    step_seconds: float = 0.0
    scheduled_tokens: int = 0
    finished: Counter = field(default_factory=Counter)
    # KV waste (allocated-but-unfilled slots / allocated slots), summed over steps with pages in use.
    _waste_sum: float = 0.0
    _waste_steps: int = 0
    last_kv: KVCacheStats | None = None

    def on_request_added(self, num_prompt_tokens: int) -> None:
        self.num_requests += 1
        self.prompt_tokens += num_prompt_tokens

    def on_request_finished(self, reason: str, parent: Any = None, req: Any = None) -> None:
        self.finished[reason] += 1

    def on_step(
        self, num_tokens: int, num_sampled: int, num_preempted: int, kv: KVCacheStats, seconds: float
    ) -> None:
        self.num_steps += 1
        self.scheduled_tokens += num_tokens
        self.generation_tokens += num_sampled
        self.step_seconds += seconds
        self.last_kv = kv
        if kv.allocated_slots:
            self._waste_sum += kv.waste
            self._waste_steps += 1

    @property
    def kv_waste_mean(self) -> float:
        return self._waste_sum / self._waste_steps if self._waste_steps else 0.0

    def snapshot(self, *, kv_stats: KVCacheStats, **extra: Any) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "num_steps": self.num_steps,
            "step_seconds": self.step_seconds,
            "scheduled_tokens": self.scheduled_tokens,
            "finished_by_reason": dict(self.finished),
            "kv_waste_mean": self.kv_waste_mean,
            "kv_pages_total": kv_stats.num_pages,
            "kv_pages_used": kv_stats.pages_used,
            "kv_pages_free": kv_stats.pages_free,
            "kv_usage": kv_stats.usage,
            "kv_waste_now": kv_stats.waste,
            "kv_pages_cached": kv_stats.pages_cached,
            **extra,
        }
