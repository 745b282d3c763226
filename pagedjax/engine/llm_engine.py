"""The engine loop: add requests, step, abort. One `step()` is

schedule  ->  execute (jitted model step + sampler)  ->  update (scheduler)  ->  outputs

request ──> Scheduler ──(which tokens)──> KVCacheManager (pages) ──> ModelRunner (jit step)
                ^                                                         │
                └── update_from_output: tokens appended, stops, pages ◄───┘
                                 │
                          OutputProcessor: text, stop strings, RequestOutput
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from typing import Any

import numpy as np

from pagedjax.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedjax.core.kv_cache_manager import KVCacheManager
from pagedjax.core.model_output import ModelOutput
from pagedjax.core.request import Request
from pagedjax.core.scheduler import Scheduler, SchedulerOutput
from pagedjax.engine.beam_group import BeamGroup
from pagedjax.engine.errors import EngineStepError, InvalidRequestError
from pagedjax.engine.output_processor import OutputProcessor, ParentRequest
from pagedjax.engine_args import EngineArgs
from pagedjax.metrics import EngineMetrics
from pagedjax.models.loader import LoadedModel, load_model
from pagedjax.outputs import RequestMetrics, RequestOutput
from pagedjax.runner.model_runner import ModelRunner
from pagedjax.sampling.beam_search import BeamSearchState
from pagedjax.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams
from pagedjax.spec_decode import SpecDecodeMetrics, SpeculativeConfig, make_proposer

PromptType = str | list[int] | dict[str, Any]
logger = logging.getLogger("pagedjax.engine")

__all__ = ["EngineStepError", "InvalidRequestError", "LLMEngine", "PromptType"]


def _child_seed(seed: int, index: int) -> int:
    return seed if index == 0 else (seed * 1_000_003 + index) & 0x7FFFFFFF


class LLMEngine:
    """The engine: a scheduler over a page pool, a model runner, and an output processor."""

    def __init__(self, config: EngineConfig, model: LoadedModel | None = None):
        self.config = config
        self.model = model or load_model(config.model, config.dtype)
        self.model_config = self.model.config
        self.tokenizer = self.model.tokenizer
        sched = config.scheduler
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
        self.output_processor = OutputProcessor(self.tokenizer, self.metrics, self.scheduler.finish)
        self._rng = np.random.default_rng(config.seed)
        self._beam_groups: dict[str, BeamGroup] = {}
        self._ids = itertools.count()
        self.last_step_result: ModelOutput | None = None
        self.num_failed_steps = 0
        spec = config.speculative
        if (
            spec
            and spec.num_draft_layers is not None
            and spec.num_draft_layers >= self.model_config.num_layers
        ):
            raise ValueError(
                f"speculative_config num_draft_layers ({spec.num_draft_layers}) must be below the "
                f"model's {self.model_config.num_layers} layers"
            )
        draft = self._load_draft_model(spec.model) if spec and spec.method == "draft_model" else None
        self.proposer = make_proposer(spec, draft) if spec else None
        self.spec_metrics = SpecDecodeMetrics()
        eos = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        if config.warmup:
            self.runner.warmup()
            if self.proposer is not None:
                self.proposer.warmup(self.runner, sched.max_num_spec_seqs)
        # Everything alive now (JAX, transformers, the model) lives for the whole run: move it out of
        # the collector's generations, so the collections the per-step objects trigger stay cheap.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        """Load the model and build the engine that `args` describes."""
        from pagedjax.platform import default_dtype, enable_compilation_cache

        dtype = default_dtype() if args.dtype == "auto" else args.dtype
        enable_compilation_cache(args.compilation_cache_dir)
        loaded = load_model(args.model, dtype)
        return cls(engine_config(args, loaded.config.max_position_embeddings, dtype), loaded)

    @classmethod
    def from_args(cls, model: str | None = None, **kwargs: Any) -> LLMEngine:
        """`from_engine_args(EngineArgs(model, **kwargs))`; an unknown keyword is a TypeError."""
        return cls.from_engine_args(EngineArgs.from_kwargs(model=model, **kwargs))

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
        request_id = self._new_request_id(request_id)
        text, ids = self._tokenize(prompt)
        cache_salt = self._cache_salt(prompt)
        self._check_prompt_ids(ids)
        params = self._fit_to_vocab(params)
        max_model_len = self.scheduler.config.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - len(ids)
        self._check_fits(len(ids), max(max_tokens, 1))
        arrival = time.time() if arrival_time is None else arrival_time
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        n_children = params.best_of or params.n
        self._check_seats("n/best_of", n_children)
        children = [
            Request(
                request_id if n_children == 1 else f"{request_id}#{i}",
                ids,
                params,
                seed=_child_seed(base_seed, i),
                max_tokens=max_tokens,
                priority=priority,
                arrival_time=arrival,
                eos_token_ids=self.eos_token_ids,
                cache_salt=cache_salt,
                prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            )
            for i in range(n_children)
        ]
        detoks = [self.output_processor.new_detokenizer(ids, params) for _ in children]
        # The first sample computes the prompt; the others fork from it (sharing its pages).
        self.scheduler.add_request(children[0])
        if len(children) > 1:
            self.scheduler.add_forked_samples(children[0], children[1:])
        self.output_processor.add(ParentRequest(request_id, text, ids, params, children, detoks, arrival))
        return request_id

    def _new_request_id(self, request_id: str | None) -> str:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.output_processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        return request_id

    @staticmethod
    def _cache_salt(prompt: PromptType) -> str | None:
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InvalidRequestError("cache_salt must be a string")
        return cache_salt

    def _check_prompt_ids(self, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        try:
            self.scheduler.check_fits(num_prompt_tokens, max_tokens)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None

    def _check_seats(self, what: str, n: int) -> None:
        limit = self.scheduler.config.max_num_seqs
        if n > limit:
            raise InvalidRequestError(f"{what} ({n}) exceeds max_num_seqs ({limit})")

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
        request_id = self._new_request_id(request_id)
        text, ids = self._tokenize(prompt)
        cache_salt = self._cache_salt(prompt)
        self._check_prompt_ids(ids)
        self._check_fits(len(ids), params.max_tokens)
        self._check_seats("beam_width", params.beam_width)
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
            cache_salt=cache_salt,
            hold_samples=True,
            num_reserved_seats=params.beam_width - 1,
        )
        self.scheduler.add_request(first)
        group.beams = [first]
        self.output_processor.add(ParentRequest(request_id, text, ids, sp, [first], [], first.arrival_time))
        self._beam_groups[request_id] = group
        return request_id

    def _advance_beam_groups(self) -> list[RequestOutput]:
        """Let every beam group whose beams all have their logprobs pick its next beams."""
        outputs = []
        for rid, group in list(self._beam_groups.items()):
            if not group.ready:
                continue
            done = group.advance(self.scheduler)
            parent = self.output_processor.parents[rid]
            parent.children = list(group.beams)
            self.output_processor.parent_of.update({b.request_id: rid for b in group.beams})
            if done:
                del self._beam_groups[rid]
                self.output_processor.remove(rid)
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
            self._beam_groups.pop(rid, None)
            parent = self.output_processor.remove(rid)
            if parent is None:
                continue
            for child in parent.children:
                if not child.is_finished:
                    self.scheduler.abort(child.request_id)
            self.metrics.on_request_finished("abort")

    def abort(self, request_id: str | list[str]) -> None:
        """Alias of abort_request."""
        self.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.parents)

    # ------------------------------------------------------------------------------ the step
    def step(self, *, final_only: bool = False) -> list[RequestOutput]:
        """Run one engine iteration; return outputs of requests that progressed (cumulative text).

        `final_only=True` returns only requests that finished in this step (what offline
        `LLM.generate` needs). If executing the step fails, its requests end with `error` set
        (pages freed) and the engine stays usable for everything else."""
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        t0 = time.perf_counter()
        try:
            copies = self.kv_cache.take_pending_copies()
            if self.proposer is not None and self.proposer.drafts_after_scheduling:
                if copies:  # copy-on-write first: the drafts write into the fresh pages
                    self.runner.copy_pages(copies)
                    copies = []
                t = time.perf_counter()
                self.proposer.fill(sched_out, self.runner, self.kv_cache.block_tables)
                self.spec_metrics.proposal_seconds += time.perf_counter() - t
            model_out = self.runner.execute(sched_out, self.kv_cache.block_tables, copies)
        except Exception as e:  # any fault of the step fails only that step's requests
            return self._fail_step(sched_out, e)
        self.last_step_result = model_out
        self._count_verified(sched_out, model_out, time.perf_counter() - t0)
        updates = self.scheduler.update_from_output(sched_out, model_out)
        outputs = self.output_processor.process(updates, final_only)
        if self._beam_groups:
            outputs += self._advance_beam_groups()
        if self.proposer is not None:
            self._propose(model_out)
        self.metrics.on_step(
            sched_out.num_tokens,
            sum(len(u.new_token_ids) for u in updates),
            len(sched_out.preempted),
            self.kv_cache.stats(),
            time.perf_counter() - t0,
        )
        return outputs

    def _load_draft_model(self, path: str):
        """The draft model of `draft_model` speculation, attached to the runner (it mirrors every
        step into its own pool). Its vocabulary must be the target's: drafts are token ids."""
        from pagedjax.runner.draft_model import DraftModel

        loaded = load_model(path, self.config.dtype)
        target_vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else None
        draft_vocab = loaded.tokenizer.get_vocab() if loaded.tokenizer is not None else None
        if loaded.config.vocab_size != self.model_config.vocab_size or (
            target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab
        ):
            raise ValueError(
                f"speculative_config draft model {path!r} has another vocabulary than the target "
                f"({loaded.config.vocab_size} vs {self.model_config.vocab_size} ids, or different "
                "tokens): drafts must be the target's token ids"
            )
        draft = DraftModel(loaded.config, loaded.params, self.runner)
        self.runner.draft_model = draft
        return draft

    def _propose(self, model_out: ModelOutput) -> None:
        """Draft tokens for the running requests that decode next step (speculative decoding).
        Requests still in their prompt (the first token, where n > 1 samples fork, comes from the
        plain prefill) and beams (their controller picks continuations from one row) get none."""
        running = self.scheduler.running
        if not self.config.speculative.active(len(running)):
            self.spec_metrics.num_disabled_steps += 1
            return
        t = time.perf_counter()
        decoding = [
            r
            for r in running
            if r.num_output_tokens
            and not r.hold_samples
            and not r.is_finished
            and r.num_computed_tokens == r.num_tokens - 1
        ]
        for rid, drafts in self.proposer.propose(decoding, model_out).items():
            self.scheduler.requests[rid].spec_token_ids = drafts
        self.spec_metrics.proposal_seconds += time.perf_counter() - t

    def _count_verified(self, sched_out: SchedulerOutput, model_out: ModelOutput, seconds: float) -> None:
        verified = False
        for ch in sched_out.prefills:
            if ch.num_spec_tokens and ch.request.request_id in model_out.sampled:
                accepted = len(model_out.sampled[ch.request.request_id]) - 1
                self.spec_metrics.on_verified(ch.num_spec_tokens, accepted)
                verified = True
        if verified:
            self.spec_metrics.verification_seconds += seconds

    def _fail_step(self, sched_out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """End the failed step's user requests with an error; recover the KV pool if it was lost."""
        self.num_failed_steps += 1
        logger.exception("engine step failed; ending its %d sequences", len(sched_out.chunks))
        seq_ids = [ch.request.request_id for ch in sched_out.chunks]
        self.kv_cache.take_pending_copies()
        outputs = self.output_processor.fail(seq_ids, f"engine step failed: {type(exc).__name__}: {exc}")
        for out in outputs:
            self._beam_groups.pop(out.request_id, None)
        if self.runner.kv_pool_lost():
            # The donated pool went down with the step: every page's K/V is gone. Drop the prefix
            # cache and let the surviving requests recompute from their tokens.
            self.runner.reallocate_kv_pool()
            self.scheduler.preempt_all()
            self.kv_cache.reset_prefix_cache()
        return outputs

    # ------------------------------------------------------------------------------ introspection
    def block_table(self, request_id: str) -> list[int]:
        """Physical pages of a running request (child 0 for n > 1)."""
        parent = self.output_processor.parents[request_id]
        return list(self.kv_cache.block_tables.get(parent.children[0].request_id, []))

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; later requests recompute them. Returns pages dropped."""
        return self.kv_cache.reset_prefix_cache()

    def shutdown(self) -> None:
        """Free the device memory (weights, KV pools, draft model) now; the engine is unusable after.
        Dropping the last reference is not enough: the engine's objects are moved out of the
        collector's generations at start-up (`gc.freeze`), so a second engine in one process (a
        notebook, a benchmark sweep) would otherwise keep the first one's buffers."""
        self.runner.release()

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
            **(self.spec_metrics.snapshot() if self.proposer is not None else {}),
        )


def engine_config(args: EngineArgs, model_max_len: int, dtype: str) -> EngineConfig:
    """The resolved configuration of the runner, pool and scheduler for `args`."""
    max_len = args.max_model_len or model_max_len
    if max_len > model_max_len:
        raise ValueError(
            f"max_model_len ({max_len}) exceeds the model's max_position_embeddings ({model_max_len})"
        )
    spec = SpeculativeConfig.parse(args.speculative_config)
    return EngineConfig(
        model=args.model,
        dtype=dtype,
        seed=args.seed,
        cache=CacheConfig(
            block_size=args.block_size,
            cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_pages=args.num_kv_pages,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=max_len,
            max_num_prefill_seqs=args.max_num_prefill_seqs,
            policy=args.scheduling_policy,
            num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
            # Drafts are made only in steps with <= disable_by_batch_size requests running.
            max_num_spec_seqs=min(
                args.max_num_seqs, args.max_num_prefill_seqs, spec.disable_by_batch_size or args.max_num_seqs
            )
            if spec
            else 0,
        ),
        attention_backend=args.attention_backend,
        matmul_backend=args.matmul_backend,
        warmup=args.warmup,
        compilation_cache_dir=args.compilation_cache_dir,
        speculative=spec,
    )
