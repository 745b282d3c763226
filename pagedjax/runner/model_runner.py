"""Turns a SchedulerOutput into device arrays, runs the jitted model step and the jitted sampler.

Per step there is exactly one host sync: reading the sampled tokens (and their logprobs when asked).
The KV pool buffers are donated to the step and come back updated in place.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.config import CacheConfig, ModelConfig, SchedulerConfig
from pagedjax.core.model_output import ModelOutput
from pagedjax.core.scheduler import SchedulerOutput
from pagedjax.models.layers.linear import pack_params, resolve_matmul_backend
from pagedjax.models.params import resolve_dtype
from pagedjax.models.registry import get_forward, get_model_class
from pagedjax.models.step_inputs import AttentionOps, StepInputs
from pagedjax.runner.buckets import BucketPolicy, StepShape, round_up
from pagedjax.runner.draft_model import delete_buffers, jit_draft_loop, run_draft_loop, warm_draft_loop
from pagedjax.runner.host_malloc import tune_host_malloc
from pagedjax.runner.kv_cache import allocate_kv_cache, copy_pages, num_pages_for
from pagedjax.sampling.metadata import SamplingRow, build_sampling_tensors
from pagedjax.sampling.sampler import compute_logprobs, sample
from pagedjax.sampling_params import SamplingParams
from pagedjax.spec_decode.verify import verified_tokens
from pallas_kernels import AttentionMetadata, get_attention_backend, get_fused_attention, get_kv_writer

# Rows that sample nothing (padding, unfinished prefill chunks): greedy, no penalties, no extra compile.
_PAD_ROW = SamplingRow(
    params=SamplingParams(temperature=0.0), prompt_ids=(), output_ids=(), seed=0, blocked_ids=()
)
PAGES_PER_CHUNK = 4  # KV pages per attention loop iteration (see pallas_kernels/reference.py)


_prompt_logprobs = jax.jit(compute_logprobs, static_argnames=("num_logprobs",))


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        cache: CacheConfig,
        sched: SchedulerConfig,
        dtype: str,
        attention_backend: str = "auto",
        matmul_backend: str = "auto",
    ):
        self.config = config
        if jax.default_backend() == "cpu":
            tune_host_malloc()  # reuse step buffers above 32 MiB instead of faulting them in anew
        self.matmul_backend = resolve_matmul_backend(matmul_backend, params)
        swiglu = get_model_class(config).swiglu_kernels
        self.params = pack_params(params, swiglu) if self.matmul_backend == "cpu" else params
        self.block_size = cache.block_size
        self.cache_dtype = resolve_dtype(cache.cache_dtype or dtype)
        pages_per_seq = -(-sched.max_model_len // cache.block_size)
        self.max_pages_per_seq = -(-pages_per_seq // PAGES_PER_CHUNK) * PAGES_PER_CHUNK
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params))
        self.num_pages = num_pages_for(
            config, cache, self.cache_dtype, weight_bytes, max_useful_pages=sched.max_num_seqs * pages_per_seq
        )
        self.k_cache, self.v_cache = allocate_kv_cache(
            config, self.num_pages, cache.block_size, self.cache_dtype
        )
        self.buckets = BucketPolicy(
            sched.max_num_seqs,
            sched.max_num_batched_tokens,
            sched.max_num_prefill_seqs,
            spec_tokens=sched.num_speculative_tokens,
            spec_seqs=sched.max_num_spec_seqs,
        )
        shape = dict(head_dim=config.head_dim, page_size=cache.block_size)
        self.attention_backend = attention_backend
        # Speculative decoding's draft model (runner/draft_model.py), when one is attached: it
        # mirrors every step's batch into its own pool and its pages follow the target's.
        self.draft_model = None
        self.attention_fn = get_attention_backend(attention_backend, **shape)
        self.write_kv_fn = get_kv_writer(attention_backend, **shape)
        # Backends that can write K/V inside the attention kernel (one call per layer) do so.
        self.fused_attention_fn = get_fused_attention(attention_backend, **shape)
        forward = get_forward(config)

        def model_step(params, k_cache, v_cache, inputs, all_logits):
            return forward(
                params,
                config,
                k_cache,
                v_cache,
                inputs,
                self.attention_fn,
                all_logits,
                self.write_kv_fn,
                self.fused_attention_fn,
            )

        self._model_step = jax.jit(model_step, static_argnames=("all_logits",), donate_argnums=(1, 2))
        ops = AttentionOps(self.attention_fn, self.write_kv_fn, self.fused_attention_fn)
        # Layer-skip speculative drafts (compiled only when that method is configured).
        self._draft_step = jit_draft_loop(config, ops, self.block_size)
        # Ahead-of-time compiled step programs, one per (bucket shape, all_logits); see _executable.
        self._executables: dict[tuple[StepShape, bool], Any] = {}
        self._compile_lock = threading.Lock()
        self._compiled: set[tuple] = set()
        self.compile_seconds = 0.0
        # Research/test hook: also return every scheduled token's logits (costs a [T, V] matmul).
        self.capture_logits = False
        # Test hook: called with each SchedulerOutput before it runs; raising fails that step
        # (the engine then ends that step's requests with an error and serves on).
        self.fault_hook: Callable[[SchedulerOutput], None] | None = None

    # ------------------------------------------------------------------------------ bookkeeping
    @property
    def num_compiles(self) -> int:
        """Distinct programs compiled so far (model step shapes + sampler variants)."""
        return len(self._compiled)

    def _note_compile(self, key: tuple) -> bool:
        if key in self._compiled:
            return False
        self._compiled.add(key)
        return True

    # ------------------------------------------------------------------------------ inputs
    def _build_inputs(self, out: SchedulerOutput, shape: StepShape, block_tables: dict[str, list[int]]):
        D, Tq, Sp, P = shape.decode_rows, shape.prefill_tokens, shape.prefill_seqs, self.max_pages_per_seq
        T = D + Tq
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_pages = np.full(T, self.num_pages, np.int32)  # out of range -> write dropped
        slot_offsets = np.zeros(T, np.int32)
        logits_idx = np.zeros(shape.num_sample_rows, np.int32)
        d_tables = np.zeros((D, P), np.int32)
        d_ctx = np.zeros(D, np.int32)
        p_tables = np.zeros((Sp, P), np.int32)
        p_ctx = np.zeros(Sp, np.int32)
        p_start = np.zeros(Sp, np.int32)
        p_len = np.zeros(Sp, np.int32)
        bs = self.block_size

        def fill(row0: int, chunk) -> np.ndarray:
            n = chunk.num_new_tokens
            table = np.asarray(block_tables[chunk.request.request_id], np.int32)
            pos = np.arange(chunk.start, chunk.end, dtype=np.int32)
            token_ids[row0 : row0 + n] = chunk.request.token_ids_slice(chunk.start, chunk.end)
            positions[row0 : row0 + n] = pos
            slot_pages[row0 : row0 + n] = table[pos // bs]
            slot_offsets[row0 : row0 + n] = pos % bs
            return table

        logits_row = {}  # id(chunk) -> its last token's row
        for i, ch in enumerate(out.decodes):
            # One token per decode row: plain scalar writes (fill's numpy temporaries cost ~10 us a
            # row, host time that shows when steps are short, e.g. small models on a GPU).
            table = block_tables[ch.request.request_id]
            pos = ch.start
            if ch.num_new_tokens == 1:
                token_ids[i] = ch.request.token_at(pos)
                positions[i] = pos
                slot_pages[i] = table[pos // bs]
                slot_offsets[i] = pos % bs
            else:
                fill(i, ch)
            d_tables[i, : len(table)] = table
            d_ctx[i] = ch.end
            logits_idx[i] = logits_row[id(ch)] = i
        row = 0
        sample_row = D  # prefill chunks' logits rows: 1 + its drafts each, packed
        prefill_rows = []
        for j, ch in enumerate(out.prefills):
            table = fill(D + row, ch)
            p_tables[j, : len(table)] = table
            p_ctx[j] = ch.end
            p_start[j] = row
            p_len[j] = ch.num_new_tokens
            row += ch.num_new_tokens
            last = logits_row[id(ch)] = D + row - 1
            # A chunk with s drafts is verified at its last s + 1 positions: the last real token
            # (scores draft 1) through the last draft (scores the bonus token).
            s = ch.num_spec_tokens
            logits_idx[sample_row : sample_row + s + 1] = np.arange(last - s, last + 1)
            prefill_rows.append(range(sample_row, sample_row + s + 1))
            sample_row += s + 1
        # Forked samples occupy decode-row slots with no token (context 0: attention gives zeros) and
        # sample from their source's logits row.
        for k, ch in enumerate(out.forks):
            logits_idx[len(out.decodes) + k] = logits_row[id(ch.source)]
        meta = AttentionMetadata(
            d_tables, d_ctx, p_tables, p_ctx, p_start, p_len, np.int32(len(out.prefills))
        )
        valid_rows = np.array([0, len(out.decodes), D, D + row], np.int32)
        nd = len(out.decodes) + len(out.forks)
        logits_valid = np.array([0, nd, D, sample_row], np.int32) if shape.spec_tokens else None
        inputs = StepInputs(
            token_ids, positions, slot_pages, slot_offsets, logits_idx, meta, valid_rows, logits_valid
        )
        # Logits rows of each chunk, in `out.chunks` order (decodes, forks, prefills).
        return inputs, [range(r, r + 1) for r in range(nd)] + prefill_rows

    # ------------------------------------------------------------------------------ execution
    def _shape(self, out: SchedulerOutput) -> StepShape:
        return self.buckets.shape_for(
            len(out.decodes) + len(out.forks), sum(c.num_new_tokens for c in out.prefills)
        )

    def kv_pool_lost(self) -> bool:
        """True when a failed step took the donated KV pool buffers with it."""
        lost = self.k_cache.is_deleted() or self.v_cache.is_deleted()
        return lost or (self.draft_model is not None and self.draft_model.lost())

    def reallocate_kv_pool(self) -> None:
        """A fresh (zeroed) pool after a failed step lost the old one; every page's K/V is gone."""
        self.k_cache, self.v_cache = allocate_kv_cache(
            self.config, self.num_pages, self.block_size, self.cache_dtype
        )
        if self.draft_model is not None:
            self.draft_model.reallocate()

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer of the pool (copy-on-write), in place."""
        n = 1 << (len(copies) - 1).bit_length()  # bucket the count: few distinct programs
        src = np.zeros(n, np.int32)
        dst = np.full(n, self.num_pages, np.int32)  # padding: out of range -> dropped
        src[: len(copies)], dst[: len(copies)] = zip(*copies, strict=True)
        self._note_compile(("copy_pages", n))
        self.k_cache, self.v_cache = copy_pages(self.k_cache, self.v_cache, src, dst)
        if self.draft_model is not None:
            self.draft_model.copy_pages(src, dst)

    def execute(
        self,
        out: SchedulerOutput,
        block_tables: dict[str, list[int]],
        page_copies: list[tuple[int, int]] = (),
    ) -> ModelOutput:
        if self.fault_hook is not None:
            self.fault_hook(out)
        if page_copies:
            self.copy_pages(list(page_copies))
        shape = self._shape(out)
        inputs, chunk_rows = self._build_inputs(out, shape, block_tables)
        chunks = out.chunks
        if self.draft_model is not None:
            self.draft_model.mirror(inputs)
        want_prompt_lp = [
            c for c in out.prefills if c.request.sampling_params.prompt_logprobs is not None
        ] + [
            c
            for c in out.decodes
            if c.request.sampling_params.prompt_logprobs is not None and c.start < c.request.num_prompt_tokens
        ]
        all_logits = bool(want_prompt_lp) or self.capture_logits

        t0 = time.perf_counter()
        new = (shape, all_logits) not in self._executables
        step = self._executable(shape, all_logits)
        logits, self.k_cache, self.v_cache = step(self.params, self.k_cache, self.v_cache, inputs)
        result = ModelOutput()
        if all_logits:
            all_rows = logits
            logits = all_rows[jnp.asarray(inputs.logits_indices)]
            if want_prompt_lp:
                self._prompt_logprobs(all_rows, inputs, out, want_prompt_lp, result)
            if self.capture_logits:
                host = np.asarray(all_rows)
                for ch, r0 in zip(chunks, self._row_starts(out, shape), strict=True):
                    result.logits[ch.request.request_id] = (ch.start, host[r0 : r0 + ch.num_new_tokens])

        rows: list[SamplingRow] = [_PAD_ROW] * shape.num_sample_rows
        for ch, rs in zip(chunks, chunk_rows, strict=True):
            if ch.samples:
                drafts = ch.request.spec_token_ids[: ch.num_spec_tokens]
                for j, r in enumerate(rs):  # position j sees drafts 1..j as its latest outputs
                    rows[r] = self._sampling_row(ch.request, drafts[:j])
        tensors, flags = build_sampling_tensors(rows, shape.num_sample_rows)
        new |= self._note_compile(
            (
                "sampler",
                shape.num_sample_rows,
                flags,
                tuple(x.shape for x in jax.tree_util.tree_leaves(tensors)),
            )
        )
        sampled = sample(logits, tensors, flags)
        tokens = np.asarray(sampled.tokens)  # the step's one host sync
        if any(
            c.samples
            and (
                c.request.sampling_params.logprobs is not None
                or (c.request.sampling_params.best_of or 1) > c.request.sampling_params.n
            )
            for c in chunks
        ):
            tok_lp = np.asarray(sampled.token_logprobs)
            top_ids, top_lp = np.asarray(sampled.topk_ids), np.asarray(sampled.topk_logprobs)
        for ch, rs in zip(chunks, chunk_rows, strict=True):
            if not ch.samples:
                continue
            rid = ch.request.request_id
            if ch.num_spec_tokens:
                drafts = ch.request.spec_token_ids[: ch.num_spec_tokens]
                emitted = verified_tokens(drafts, [int(tokens[r]) for r in rs])
            else:
                emitted = [int(tokens[rs[0]])]
            result.sampled[rid] = emitted
            sp = ch.request.sampling_params
            if sp.logprobs is not None or (sp.best_of or 1) > sp.n:
                entries = []
                for token, r in zip(emitted, rs, strict=False):
                    lp = {int(top_ids[r, k]): float(top_lp[r, k]) for k in range(sp.logprobs or 0)}
                    lp[token] = float(tok_lp[r])
                    entries.append(lp)
                result.logprobs[rid] = entries
        if new:
            self.compile_seconds += time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------------------ drafting
    def draft_layer_skip(
        self, chunks: list, block_tables: dict[str, list[int]], num_layers: int, num_tokens: int
    ) -> list[list[int]]:
        """Self-speculative drafts for this step's verification chunks (run before the step, after
        its pages were allocated and copied): the first `num_layers` layers propose each chunk's
        `num_spec_tokens` drafts greedily, in one device call. Returns the drafts per chunk."""
        arrays = self.draft_inputs(chunks, block_tables)
        t0 = time.perf_counter()
        new = self._note_compile(("draft", len(arrays[0]), num_layers, num_tokens))
        drafts, self.k_cache, self.v_cache = run_draft_loop(
            self._draft_step,
            self.params,
            self.k_cache,
            self.v_cache,
            arrays,
            chunks,
            num_layers=num_layers,
            num_tokens=num_tokens,
        )
        if new:
            self.compile_seconds += time.perf_counter() - t0
        return drafts

    def draft_inputs(self, chunks: list, block_tables: dict[str, list[int]]):
        """Host arrays of a draft loop over verification chunks, padded to a row bucket: each row's
        last sampled token, its position, block table and number of drafts to make."""
        rows = self._draft_rows(len(chunks))
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros(rows, np.int32)
        tables = np.zeros((rows, self.max_pages_per_seq), np.int32)
        num_drafts = np.zeros(rows, np.int32)
        for r, ch in enumerate(chunks):
            table = block_tables[ch.request.request_id]
            tokens[r] = ch.request.token_at(ch.start)  # the last sampled token
            positions[r] = ch.start
            tables[r, : len(table)] = table
            num_drafts[r] = ch.num_spec_tokens
        return tokens, positions, tables, num_drafts

    def _draft_rows(self, n: int) -> int:
        return round_up(n, [b for b in self.buckets.decode_buckets if b])

    def draft_row_buckets(self, max_rows: int) -> list[int]:
        """The row counts a draft loop over up to `max_rows` chunks is compiled for."""
        return sorted({self._draft_rows(n) for n in range(1, max_rows + 1)})

    def warmup_drafts(self, num_layers: int, num_tokens: int, max_rows: int) -> None:
        """Compile the layer-skip draft program for every row bucket up to `max_rows`."""
        for rows in self.draft_row_buckets(max_rows):
            t0 = time.perf_counter()
            self.k_cache, self.v_cache = warm_draft_loop(
                self._draft_step,
                self.params,
                self.k_cache,
                self.v_cache,
                rows,
                self.max_pages_per_seq,
                num_layers=num_layers,
                num_tokens=num_tokens,
            )
            self._note_compile(("draft", rows, num_layers, num_tokens))
            self.compile_seconds += time.perf_counter() - t0

    def release(self) -> None:
        """Free the weights and KV pools (and a draft model's) now; the runner is unusable after."""
        delete_buffers(self.k_cache, self.v_cache, self.params)
        if self.draft_model is not None:
            self.draft_model.release()
        self._executables.clear()

    @staticmethod
    def _row_starts(out: SchedulerOutput, shape: StepShape) -> list[int]:
        """First flat token row of each chunk, in `out.chunks` order (forks own no token rows)."""
        starts = list(range(len(out.decodes) + len(out.forks)))
        row = shape.decode_rows
        for ch in out.prefills:
            starts.append(row)
            row += ch.num_new_tokens
        return starts

    def _sampling_row(self, req, drafts: list[int] = ()) -> SamplingRow:
        """The request's sampling row at the position after its output plus `drafts` (a
        speculative chunk's later positions): penalties, min_tokens and the RNG counter all see
        the drafts as outputs, exactly as a plain step at that position would."""
        sp = req.sampling_params
        blocked: list[int] = []
        if req.num_output_tokens + len(drafts) < sp.min_tokens:
            blocked = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else list(req.eos_token_ids))
        return SamplingRow(
            params=sp,
            prompt_ids=req.prompt_token_ids,
            output_ids=req.output_token_ids + list(drafts) if drafts else req.output_token_ids,
            seed=req.seed,
            blocked_ids=blocked,
        )

    def _prompt_logprobs(
        self, all_rows, inputs: StepInputs, out: SchedulerOutput, chunks, result: ModelOutput
    ):
        """Logprob of each prompt token given its prefix (vLLM's prompt_logprobs), for chunks that
        cover prompt positions. Position p's logits score prompt token p + 1."""
        shape = self._shape(out)
        starts = {
            c.request.request_id: r for c, r in zip(out.chunks, self._row_starts(out, shape), strict=True)
        }
        next_ids = np.zeros(all_rows.shape[0], np.int32)
        spans = []
        n = max(c.request.sampling_params.prompt_logprobs for c in chunks)
        for ch in chunks:
            req = ch.request
            r0 = starts[req.request_id]
            last = min(ch.end, req.num_prompt_tokens - 1)  # positions with a next prompt token
            for pos in range(ch.start, last):
                next_ids[r0 + pos - ch.start] = req.prompt_token_ids[pos + 1]
            spans.append((req, r0, ch.start, last))
        tok, top_ids, top_lp = (
            np.asarray(x) for x in _prompt_logprobs(all_rows, jnp.asarray(next_ids), num_logprobs=n)
        )
        for req, r0, start, last in spans:
            k = req.sampling_params.prompt_logprobs
            entries = result.prompt_logprobs.setdefault(req.request_id, [])
            for pos in range(start, last):
                r = r0 + pos - start
                d = {int(top_ids[r, i]): float(top_lp[r, i]) for i in range(k)}
                d[int(next_ids[r])] = float(tok[r])
                entries.append((pos + 1, d))

    # ------------------------------------------------------------------------------ compilation
    def _example_inputs(self, shape: StepShape) -> StepInputs:
        """All-padding inputs of a bucket shape (every K/V write is dropped)."""
        from pallas_kernels import empty_metadata

        T = shape.num_tokens
        meta = empty_metadata(shape.decode_rows, shape.prefill_seqs, self.max_pages_per_seq)
        z = np.zeros(T, np.int32)
        return StepInputs(
            z,
            z,
            np.full(T, self.num_pages, np.int32),
            z,
            np.zeros(shape.num_sample_rows, np.int32),
            meta,
            np.zeros(4, np.int32),  # no valid rows
            np.zeros(4, np.int32) if shape.spec_tokens else None,
        )

    def _executable(self, shape: StepShape, all_logits: bool):
        """The compiled step program for a bucket shape, compiled on first use (thread-safe).

        Compiling ahead of time (lower + compile) instead of relying on jit's cache lets warm-up
        compile several shapes in parallel threads and makes the compile counter exact.
        """
        key = (shape, all_logits)
        exe = self._executables.get(key)
        if exe is None:
            lowered = self._model_step.lower(
                self.params, self.k_cache, self.v_cache, self._example_inputs(shape), all_logits=all_logits
            )
            exe = lowered.compile()
            with self._compile_lock:
                exe = self._executables.setdefault(key, exe)
                self._compiled.add(("model", shape, all_logits))
        return exe

    def warmup(self, shapes: list[StepShape] | None = None, threads: int | None = None) -> int:
        """Compile the step program of every bucket shape (XLA compiles are single-threaded, so
        they run in parallel threads), then the greedy sampler for every row count."""
        shapes = shapes or self.buckets.all_shapes()
        t0 = time.perf_counter()
        before = len(self._executables)
        threads = threads or max(1, min(len(shapes), os.cpu_count() or 1))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda sh: self._executable(sh, False), shapes))
        for rows in sorted({sh.num_sample_rows for sh in shapes}):
            tensors, flags = build_sampling_tensors([_PAD_ROW] * rows, rows)
            sample(
                jnp.zeros((rows, self.config.vocab_size), jnp.float32), tensors, flags
            ).tokens.block_until_ready()
            self._note_compile(
                ("sampler", rows, flags, tuple(x.shape for x in jax.tree_util.tree_leaves(tensors)))
            )
        self.compile_seconds += time.perf_counter() - t0
        return len(self._executables) - before
