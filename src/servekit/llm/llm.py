"""LLM: offline batch generation and chat (vLLM's ``LLM`` class, on our engine)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from servekit.llm.config import EngineConfig
from servekit.llm.outputs import RequestOutput
from servekit.llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from servekit.llm.engine import EngineStats
    from servekit.llm.inputs import EngineInput

# A prompt: text, token ids, or a dict with "prompt" or "prompt_token_ids" (vLLM's TextPrompt/TokensPrompt).
PromptInput = str | Sequence[int] | Mapping[str, Any]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        """``model``: an HF checkpoint directory, a ``.gguf`` file or a hub id; None is the bundled
        SmolLM2-135M-Instruct. ``engine_kwargs`` are ``EngineConfig`` fields (dtype, max_model_len, ...)."""
        from servekit.llm.engine import LLMEngine

        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched by the engine); outputs come back in prompt order."""
        items = _normalise_prompts(prompts, prompt_token_ids)
        params_list = _params_for(sampling_params, len(items))
        inputs = self.engine.inputs
        prepared = [
            inputs.prepare(text, params, ids) for (text, ids), params in zip(items, params_list, strict=True)
        ]
        return self._run(prepared, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template and generate its reply."""
        conversations: list[list[Message]]
        if messages and isinstance(messages[0], Mapping):
            conversations = [list(messages)]  # type: ignore[arg-type]
        else:
            conversations = [list(conv) for conv in messages]  # type: ignore[arg-type]
        params_list = _params_for(sampling_params, len(conversations))
        prepared = [
            self.engine.inputs.prepare_chat(
                conversation,
                params,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs,
            )
            for conversation, params in zip(conversations, params_list, strict=True)
        ]
        return self._run(prepared, use_tqdm)

    def _run(self, prepared: list[EngineInput], use_tqdm: bool = False) -> list[RequestOutput]:
        engine = self.engine
        order: dict[str, int] = {}
        progress: Any = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(prepared), desc="Generating", unit="req")
        try:
            for item in prepared:
                request_id = f"offline-{next(self._ids)}"
                engine.add_request(request_id, item)
                order[request_id] = len(order)
            results: list[RequestOutput | None] = [None] * len(order)
            while engine.has_unfinished_requests():
                for output in engine.step(final_only=True):
                    if output.request_id in order:
                        results[order[output.request_id]] = output
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            engine.abort_request(list(order))
            raise
        finally:
            if progress is not None:
                progress.close()
        return [r for r in results if r is not None]


def _normalise_prompts(
    prompts: PromptInput | Sequence[PromptInput] | None, prompt_token_ids: Sequence[Sequence[int]] | None
) -> list[tuple[str | None, list[int] | None]]:
    if prompt_token_ids is not None:
        return [(None, [int(t) for t in ids]) for ids in prompt_token_ids]
    if prompts is None:
        raise ValueError("prompts or prompt_token_ids is required")
    batch: list[Any]
    if isinstance(prompts, str | Mapping) or (prompts and isinstance(prompts[0], int)):
        batch = [prompts]
    else:
        batch = list(prompts)
    items: list[tuple[str | None, list[int] | None]] = []
    for prompt in batch:
        if isinstance(prompt, str):
            items.append((prompt, None))
        elif isinstance(prompt, Mapping):
            ids = prompt.get("prompt_token_ids")
            items.append((prompt.get("prompt"), None if ids is None else [int(t) for t in ids]))
        else:
            items.append((None, [int(t) for t in prompt]))
    return items


def _params_for(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
