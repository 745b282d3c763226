"""Prometheus metrics of the server (`GET /metrics`), named like vLLM's with a `pagedjax:` prefix.

Engine state (running/waiting requests, KV pages, preemptions, token counters) is read from a fresh
`engine.get_metrics()` snapshot at scrape time; per-request histograms (TTFT, TPOT, end-to-end,
queue time) and the finish-reason counter are observed by the engine thread when a request ends.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedjax.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineCollector:
    def __init__(self, server_metrics: ServerMetrics):
        self.sm = server_metrics

    def collect(self):
        m = self.sm.snapshot
        labels = ["model_name"]
        lv = [self.sm.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"pagedjax:{name}", doc, labels=labels)
            g.add_metric(lv, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"pagedjax:{name}", doc, labels=labels)
            c.add_metric(lv, float(value))
            return c

        yield gauge("num_requests_running", "Sequences being run by the engine.", m.get("num_running", 0))
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", m.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "KV-cache pages in use (0-1).", m.get("kv_usage", 0.0))
        yield gauge("kv_cache_pages_used", "KV-cache pages in use.", m.get("kv_pages_used", 0))
        yield gauge("kv_cache_pages_total", "KV-cache pages in the pool.", m.get("kv_pages_total", 0))
        yield counter("num_preemptions", "Cumulative preemptions.", m.get("num_preemptions", 0))
        yield counter("prompt_tokens", "Prompt tokens admitted.", m.get("prompt_tokens", 0))
        yield counter("generation_tokens", "Tokens generated.", m.get("generation_tokens", 0))
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            m.get("prefix_cache_queries", 0),
        )
        yield counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache.", m.get("prefix_cache_hits", 0)
        )
        yield counter(
            "prefix_cache_evictions", "Cached pages evicted for reuse.", m.get("prefix_cache_evictions", 0)
        )
        yield gauge("kv_cache_pages_cached", "Pages holding a findable prefix.", m.get("kv_pages_cached", 0))
        if "spec_num_drafts" in m:  # speculative decoding is on (vLLM's spec_decode_* names)
            yield counter("spec_decode_num_drafts", "Chunks that verified drafts.", m["spec_num_drafts"])
            yield counter(
                "spec_decode_num_draft_tokens", "Draft tokens verified.", m["spec_num_draft_tokens"]
            )
            yield counter(
                "spec_decode_num_accepted_tokens", "Draft tokens accepted.", m["spec_num_accepted_tokens"]
            )
            per_pos = CounterMetricFamily(
                "pagedjax:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted at each position.",
                labels=[*labels, "position"],
            )
            for j, n in enumerate(m["spec_accepted_per_position"]):
                per_pos.add_metric([*lv, str(j)], float(n))
            yield per_pos
            yield counter(
                "spec_decode_proposal_seconds", "Host time proposing drafts.", m["spec_proposal_seconds"]
            )
            yield counter(
                "spec_decode_verification_seconds",
                "Wall time of steps that verified drafts.",
                m["spec_verification_seconds"],
            )


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot: dict[str, Any] = {}
        lab = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "pagedjax:time_to_first_token_seconds",
            "Time to first token.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pagedjax:time_per_output_token_seconds",
            "Mean time per output token after the first.",
            lab,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pagedjax:e2e_request_latency_seconds",
            "End-to-end request latency.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "pagedjax:request_queue_time_seconds",
            "Time from arrival to first schedule.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "pagedjax:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        r.register(_EngineCollector(self))

    # called on the engine thread
    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        name = self.model_name
        if m is not None:
            if m.time_to_first_token is not None:
                self.ttft.labels(name).observe(m.time_to_first_token)
            if m.e2e_latency is not None:
                self.e2e.labels(name).observe(m.e2e_latency)
            if m.time_in_queue is not None:
                self.queue.labels(name).observe(m.time_in_queue)
            n_out = max((len(o.token_ids) for o in out.outputs), default=0)
            if n_out > 1 and m.first_token_time is not None and m.finished_time is not None:
                self.tpot.labels(name).observe((m.finished_time - m.first_token_time) / (n_out - 1))
        reason = out.outputs[0].finish_reason if out.outputs else "stop"
        self.success.labels(name, reason or "stop").inc()

    def on_abort(self) -> None:
        self.success.labels(self.model_name, "abort").inc()

    def render(self, snapshot: dict[str, Any]) -> bytes:
        self.snapshot = snapshot
        return generate_latest(self.registry)
