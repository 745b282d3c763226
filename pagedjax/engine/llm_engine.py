"""The engine loop: add requests, step, abort. One `step()` = schedule -> run the jitted model step and
sampler -> append tokens, detokenize, check stop conditions -> free finished requests' pages.

    request ──> Scheduler ──(which tokens)──> KVCacheManager (pages) ──> ModelRunner (jit step)
                    ^                                                         │
                    └──────── tokens appended, finished requests freed <── Sampler
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedjax.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.request import Request, RequestStatus
from pagedjax.core.scheduler import Scheduler
from pagedjax.engine.beam_group import BeamGroup
from pagedjax.engine.detokenizer import IncrementalDetokenizer
from pagedjax.metrics import EngineMetrics
from pagedjax.models.loader import LoadedModel, load_model
from pagedjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedjax.runner.model_runner import ModelRunner, StepResult
from pagedjax.sampling.beam_search import BeamSearchState
from pagedjax.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams

PromptType = str | list[int] | dict[str, Any]


class InvalidRequestError(ValueError):
    """A request the engine cannot accept (bad prompt, too long, duplicate id, ...)."""


@dataclass
class _ParentRequest:
    """A user request; it owns n (or best_of) child sequences that the scheduler runs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def _child_seed(seed: int, index: int) -> int:
    return seed if index == 0 else (seed * 1_000_003 + index) & 0x7FFFFFFF


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LoadedModel | None = None):
        self.config = config
        self.model = model or load_model(config.model, config.dtype)
        self.model_config = self.model.config
        self.tokenizer = self.model.tokenizer
        sched = config.scheduler
        if sched.max_num_batched_tokens < 2:
            raise ValueError("max_num_batched_tokens must be >= 2")
        self.runner = ModelRunner(
            self.model_config,
            self.model.params,
            config.cache,
            sched,
            config.dtype,
            config.attention_backend,
            config.matmul_backend,
        )
        # The runner may have packed the weights for its matmul kernel: keep one copy in memory.
        self.model.params = self.runner.params
        self.kv_cache = KVCacheManager(
            self.runner.num_pages, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(sched, self.kv_cache)
        self.metrics = EngineMetrics()
        self._rng = np.random.default_rng(config.seed)
        self._parents: dict[str, _ParentRequest] = {}
        self._beam_groups: dict[str, BeamGroup] = {}
        self._child_to_parent: dict[str, str] = {}
        self._ids = itertools.count()
        self.last_step_result: StepResult | None = None
        eos = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        if config.warmup:
            self.runner.warmup()
        # Everything alive now (JAX, transformers, the model) lives for the whole run: move it out of
        # the collector's generations, so the collections the per-step objects trigger stay cheap.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_args(
        cls,
        model: str | None = None,
        *,
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        num_kv_pages: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 1024,
        max_model_len: int | None = None,
        max_num_prefill_seqs: int = 32,
        scheduling_policy: str = "fcfs",
        attention_backend: str = "auto",
        matmul_backend: str = "auto",
        warmup: bool = True,
        compilation_cache_dir: str | None = None,
    ) -> LLMEngine:
        if dtype == "auto":
            dtype = default_dtype()
        enable_compilation_cache(compilation_cache_dir)
        loaded = load_model(model, dtype)
        max_len = max_model_len or loaded.config.max_position_embeddings
        if max_len > loaded.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_len}) exceeds the model's max_position_embeddings "
                f"({loaded.config.max_position_embeddings})"
            )
        cfg = EngineConfig(
            model=model,
            dtype=dtype,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size,
                cache_dtype=None if kv_cache_dtype == "auto" else kv_cache_dtype,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=gpu_memory_utilization,
                num_pages=num_kv_pages,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_len,
                max_num_prefill_seqs=max_num_prefill_seqs,
                policy=scheduling_policy,
            ),
            attention_backend=attention_backend,
            matmul_backend=matmul_backend,
            warmup=warmup,
            compilation_cache_dir=compilation_cache_dir,
        )
        return cls(cfg, loaded)

    # ------------------------------------------------------------------------------ requests
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown:
                raise InvalidRequestError(f"unknown prompt fields: {sorted(unknown)}")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise InvalidRequestError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt)}"
        )

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; raises InvalidRequestError (a ValueError) without touching other requests."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InvalidRequestError("cache_salt must be a string")
        vocab = self.model_config.vocab_size
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        params = self._fit_to_vocab(params)
        max_model_len = self.scheduler.config.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - len(ids)
        try:
            self.scheduler.check_fits(len(ids), max(max_tokens, 1))
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        arrival = time.time() if arrival_time is None else arrival_time
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        n_children = params.best_of or params.n
        if n_children > self.scheduler.config.max_num_seqs:
            raise InvalidRequestError(
                f"n/best_of ({n_children}) exceeds max_num_seqs ({self.scheduler.config.max_num_seqs})"
            )
        children, detoks = [], []
        for i in range(n_children):
            cid = request_id if n_children == 1 else f"{request_id}#{i}"
            child = Request(
                cid,
                ids,
                params,
                seed=_child_seed(base_seed, i),
                max_tokens=max_tokens,
                priority=priority,
                arrival_time=arrival,
                eos_token_ids=self.eos_token_ids,
                cache_salt=cache_salt,
            )
            if params.prompt_logprobs is not None:
                child.prompt_logprobs = [None]
            children.append(child)
            detoks.append(
                IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    params.skip_special_tokens,
                    params.stop,
                    params.include_stop_str_in_output,
                )
            )
        parent = _ParentRequest(request_id, text, ids, params, children, detoks, arrival)
        # The first sample computes the prompt; the others fork from it (sharing its pages).
        self.scheduler.add_request(children[0])
        if len(children) > 1:
            self.scheduler.add_forked_samples(children[0], children[1:])
        for child in children:
            self._child_to_parent[child.request_id] = request_id
        self._parents[request_id] = parent
        self.metrics.on_request_added(len(ids))
        return request_id

    def _fit_to_vocab(self, params: SamplingParams) -> SamplingParams:
        """Token ids the batched sampler packs into int32 arrays must be real vocabulary ids:
        out-of-vocab `logit_bias` keys are an error (as in vLLM); `top_k >= vocab` means all tokens
        and `stop_token_ids` that can never be sampled are dropped (neither changes any output)."""
        vocab = self.model_config.vocab_size
        bad = sorted(t for t in params.logit_bias or () if not 0 <= t < vocab)
        if bad:
            raise InvalidRequestError(f"logit_bias token ids {bad[:8]} are not in the vocabulary ({vocab})")
        stop_ids = [t for t in params.stop_token_ids or () if 0 <= t < vocab]
        if params.top_k >= vocab or stop_ids != list(params.stop_token_ids or ()):
            params = params.clone(top_k=0 if params.top_k >= vocab else params.top_k, stop_token_ids=stop_ids)
        return params

    def add_beam_search_request(
        self, request_id: str | None, prompt: PromptType, params: BeamSearchParams
    ) -> str:
        """Queue a beam search; its one output (beam_width hypotheses, best first) comes when done."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError("beam search needs BeamSearchParams")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if min(ids) < 0 or max(ids) >= self.model_config.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        try:
            self.scheduler.check_fits(len(ids), params.max_tokens)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if params.beam_width > self.scheduler.config.max_num_seqs:
            raise InvalidRequestError(
                f"beam_width ({params.beam_width}) exceeds max_num_seqs "
                f"({self.scheduler.config.max_num_seqs})"
            )
        eos = () if params.ignore_eos else self.eos_token_ids
        state = BeamSearchState(params.beam_width, params.max_tokens, params.length_penalty, eos)
        if state.num_candidates > MAX_LOGPROBS:
            raise InvalidRequestError(
                f"beam_width {params.beam_width} needs {state.num_candidates} candidates per beam; "
                f"at most {MAX_LOGPROBS} are supported"
            )
        sp = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, logprobs=state.num_candidates)
        group = BeamGroup(request_id, params, state, beams=[])
        first = Request(
            group.beam_id(),
            ids,
            sp,
            seed=0,
            max_tokens=params.max_tokens,
            eos_token_ids=self.eos_token_ids,
            cache_salt=prompt.get("cache_salt") if isinstance(prompt, dict) else None,
            hold_samples=True,
            num_reserved_seats=params.beam_width - 1,
        )
        self.scheduler.add_request(first)
        group.beams = [first]
        parent = _ParentRequest(request_id, text, ids, sp, [first], [], first.arrival_time)
        self._parents[request_id] = parent
        self._beam_groups[request_id] = group
        self.metrics.on_request_added(len(ids))
        return request_id

    def _advance_beam_groups(self) -> list[RequestOutput]:
        """Let every beam group whose beams all have their logprobs pick its next beams."""
        outputs = []
        for rid, group in list(self._beam_groups.items()):
            if not group.ready:
                continue
            done = group.advance(self.scheduler)
            parent = self._parents[rid]
            parent.children = list(group.beams)
            if done:
                del self._beam_groups[rid]
                del self._parents[rid]
                self.metrics.on_request_finished("stop")
                outputs.append(
                    RequestOutput(
                        request_id=rid,
                        prompt=parent.prompt,
                        prompt_token_ids=parent.prompt_token_ids,
                        outputs=group.outputs(self.tokenizer),
                        finished=True,
                        metrics=RequestMetrics(arrival_time=parent.arrival_time, finished_time=time.time()),
                    )
                )
        return outputs

    def abort_request(self, request_id: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); their pages are free at once."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            parent = self._parents.pop(rid, None)
            self._beam_groups.pop(rid, None)
            if parent is None:
                continue
            for child in parent.children:
                if not child.is_finished:
                    self.scheduler.abort(child.request_id)
                    child.finished_time = time.time()
                self._child_to_parent.pop(child.request_id, None)
            self.metrics.on_request_finished("abort")

    def abort(self, request_id: str | list[str]) -> None:
        """Alias of abort_request."""
        self.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ------------------------------------------------------------------------------ the step
    def step(self, *, final_only: bool = False) -> list[RequestOutput]:
        """Run one engine iteration; return outputs of requests that progressed (cumulative text).

        `final_only=True` returns only requests that finished in this step (what offline
        `LLM.generate` needs): building a cumulative output for every running request on every
        step copies its token list each time, host work that matters when steps are short."""
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        t0 = time.perf_counter()
        copies = self.kv_cache.take_pending_copies()
        result = self.runner.execute(sched_out, self.kv_cache.block_tables, copies)
        self.last_step_result = result
        self.scheduler.share_forked_pages(sched_out)
        now = time.time()
        touched: dict[str, _ParentRequest] = {}
        bs = self.kv_cache.block_size
        for ch in sched_out.chunks:
            req = ch.request
            req.num_computed_tokens = ch.end
            self.kv_cache.mark_filled(req.request_id, ch.end)
            if ch.end // bs > ch.start // bs:  # a page filled up: make it findable
                self.kv_cache.cache_full_pages(req.request_id, ch.end, req.token_ids_slice(0, ch.end))
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            for idx, lp in result.prompt_logprobs.get(req.request_id, []):
                if req.prompt_logprobs is not None and idx == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(lp)
            token = result.sampled.get(req.request_id)
            if token is None:
                continue
            if req.hold_samples:  # a beam: the beam controller picks its continuation
                req.held_logprobs = result.logprobs.get(req.request_id)
                continue
            parent = self._parents[self._child_to_parent[req.request_id]]
            touched[parent.request_id] = parent
            self._append_token(parent, req, token, result.logprobs.get(req.request_id), now)
        self.metrics.on_step(
            sched_out.num_tokens,
            len(result.sampled),
            len(sched_out.preempted),
            self.kv_cache.stats(),
            time.perf_counter() - t0,
        )
        outputs = [self._make_output(p) for p in touched.values() if p.finished or not final_only]
        if self._beam_groups:
            outputs += self._advance_beam_groups()
        for p in touched.values():
            if p.finished:
                self._parents.pop(p.request_id, None)
                for c in p.children:
                    self._child_to_parent.pop(c.request_id, None)
        return outputs

    def _append_token(self, parent: _ParentRequest, req: Request, token: int, logprobs, now: float) -> None:
        req.output_token_ids.append(token)
        if logprobs is not None:
            req.logprobs.append(logprobs)
        if req.first_token_time is None:
            req.first_token_time = now
        sp = req.sampling_params
        detok = parent.detoks[parent.children.index(req)]
        stop_str = detok.add_token(token)
        status = None
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens:
            if token in sp.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
            elif not sp.ignore_eos and token in self.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif stop_str is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if status is None and (
            n_out >= req.max_tokens or req.num_tokens >= self.scheduler.config.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            req.finished_time = now
            self.scheduler.finish(req, status)
            if parent.finished:
                self.metrics.on_request_finished(status.value, parent, req)

    def _make_output(self, parent: _ParentRequest) -> RequestOutput:
        sp = parent.params
        outs = []
        for i, (child, detok) in enumerate(zip(parent.children, parent.detoks, strict=True)):
            cum = (
                float(sum(lp[t] for lp, t in zip(child.logprobs, child.output_token_ids, strict=False)))
                if child.logprobs
                else None
            )
            outs.append(
                CompletionOutput(
                    index=i,
                    text=detok.text,
                    token_ids=list(child.output_token_ids),
                    cumulative_logprob=cum,
                    logprobs=list(child.logprobs) if sp.logprobs is not None else None,
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        finished = parent.finished
        if sp.best_of and sp.best_of > sp.n:
            if not finished:
                outs = []
            else:
                outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[: sp.n]
                for i, o in enumerate(outs):
                    o.index = i
        first = parent.children[0]
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_scheduled_time=min(
                (c.first_scheduled_time for c in parent.children if c.first_scheduled_time is not None),
                default=None,
            ),
            first_token_time=min(
                (c.first_token_time for c in parent.children if c.first_token_time is not None), default=None
            ),
            finished_time=max((c.finished_time or 0.0) for c in parent.children) if finished else None,
            num_preemptions=sum(c.num_preemptions for c in parent.children),
        )
        parent.num_cached_tokens = first.num_cached_tokens or 0
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=metrics,
            num_cached_tokens=parent.num_cached_tokens,
        )

    # ------------------------------------------------------------------------------ introspection
    def block_table(self, request_id: str) -> list[int]:
        """Physical pages of a running request (child 0 for n > 1)."""
        parent = self._parents[request_id]
        return list(self.kv_cache.block_tables.get(parent.children[0].request_id, []))

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; later requests recompute them. Returns pages dropped."""
        return self.kv_cache.reset_prefix_cache()

    def get_metrics(self) -> dict[str, Any]:
        stats = self.kv_cache.stats()
        kv = self.kv_cache
        return self.metrics.snapshot(
            kv_stats=stats,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            prefix_cache_hit_rate=kv.num_hit_tokens / kv.num_queried_tokens if kv.num_queried_tokens else 0.0,
            prefix_cache_evictions=kv.pool.num_evictions,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_compiles=self.runner.num_compiles,
            compile_seconds=self.runner.compile_seconds,
            num_preemptions=self.scheduler.num_preemptions,
        )


def default_dtype() -> str:
    """bfloat16 where it is fast, else float32.

    Fast: accelerators, and CPUs where the packed bf16 matmul kernel (pallas_kernels.cpu.amx_matmul)
    beats the float32 one: with AMX tiles (several times the float32 rate), or with AVX-512 BF16 dot
    products on AMD Zen 4 (measured 1.9-2.2x the float32 kernel at 64-1,024 rows). Not on Intel CPUs
    with AVX-512 BF16 but no AMX: their VDPBF16PS measured at half the float32 FMA rate (README,
    2026-11-22). Without the kernel, XLA's own bf16 dot measured slower than float32 on every CPU
    tried here (it re-packs the weight on every call)."""
    import jax

    if jax.devices()[0].platform != "cpu":
        return "bfloat16"
    from pallas_kernels.cpu import amx_matmul

    kernel = amx_matmul.kernel_name()
    if kernel == "amx" or (kernel == "avx512_bf16" and _cpu_vendor() == "AuthenticAMD"):
        return "bfloat16"
    return "float32"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def enable_compilation_cache(path: str | None) -> None:
    """Persist compiled XLA programs across processes (~10x faster start-up the second time)."""
    import os

    import jax

    path = path or os.environ.get("PAGEDJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/pagedjax/xla"))
    if path.lower() in ("", "0", "off", "none"):
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
