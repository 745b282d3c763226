"""The offline API: `LLM(...).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedjax.engine.errors import EngineStepError
from pagedjax.engine.llm_engine import LLMEngine, PromptType
from pagedjax.engine_args import EngineArgs
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """Load a model once, then generate for many prompts at once with continuous batching.

    `LLM(model, **settings)`: `model` is a Hugging Face folder (config.json + safetensors), a .gguf
    file, an orbax checkpoint, or None for the built-in SmolLM2-135M-Instruct (no download). The
    settings are the fields of `pagedjax.EngineArgs` (dtype, block_size, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, attention_backend, ...: see its help texts or
    the README's settings table); an unknown name raises TypeError naming the closest one.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)

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
        prompts = [self.render_chat(c, chat_template, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, Any]:
        """One conversation through the chat template, as a prompt dict (text and token ids)."""
        tok = self.get_tokenizer()
        text = tok.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
        )
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

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
                    if out.error is not None:
                        raise EngineStepError(out.error, [out.request_id])
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def shutdown(self) -> None:
        """Free this engine's device memory now (see `LLMEngine.shutdown`); unusable after."""
        self.llm_engine.shutdown()

    def get_metrics(self) -> dict[str, Any]:
        """Engine counters: tokens, steps, KV pages used/free, mean KV waste, compiles, preemptions."""
        return self.llm_engine.get_metrics()
