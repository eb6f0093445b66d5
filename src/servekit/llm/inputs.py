"""Request -> engine input, once: chat template, tokenization, and the checks against the model
(token ids within the vocabulary, prompt within the context, sampling token ids).

``InputProcessor.prepare``/``prepare_chat`` return an ``EngineInput``, which ``LLMEngine.add_request``
and ``AsyncEngine.generate`` take as they are; a raw prompt given to them goes through
``prepare`` once. Only reads the tokenizer, so any thread may call it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servekit.llm.chat_template import ChatTemplate, ChatTemplateError, resolve_chat_template
from servekit.llm.errors import EngineInputError, PromptTooLongError
from servekit.llm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from servekit.llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineInput:
    """A prompt and its sampling parameters, checked against the model by an ``InputProcessor``."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class InputProcessor:
    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, chat_template: str | None
    ) -> None:
        """``chat_template``: the default template's source (the model's, or a configured one)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.chat_template_source = chat_template

    # ----------------------------------------------------------------------------- prompts
    def prepare(
        self,
        prompt: str | None,
        params: SamplingParams | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> EngineInput:
        """Text (tokenized here) or token ids (checked against the vocabulary), with its params."""
        if prompt_token_ids is not None:
            token_ids = [int(t) for t in prompt_token_ids]
            self.check_token_ids(token_ids, "prompt")
        elif prompt is not None:
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            raise EngineInputError("either prompt or prompt_token_ids is required")
        return self._checked(prompt, token_ids, params)

    def prepare_chat(
        self,
        messages: Sequence[Any],
        params: SamplingParams | None = None,
        **options: Any,
    ) -> EngineInput:
        """A conversation rendered with the chat template (``options``: those of ``render_chat``)."""
        text = self.render_chat(messages, **options)
        return self._checked(text, self._encode_rendered(text), params)

    def chat_token_ids(self, messages: Sequence[Any], **options: Any) -> list[int]:
        """The token ids of a rendered conversation, unchecked (for ``/tokenize``-like routes)."""
        return self._encode_rendered(self.render_chat(messages, **options))

    def _encode_rendered(self, text: str) -> list[int]:
        # The template already wrote any special tokens (e.g. BOS) it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render_chat(
        self,
        messages: Sequence[Any],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text of ``messages`` (dicts or pydantic models) with the default template, or
        ``chat_template`` (a path or a template source) when given."""
        if chat_template is not None:
            try:
                template = self._template(resolve_chat_template(chat_template))
            except ChatTemplateError as error:
                raise EngineInputError(str(error), "chat_template") from None
        elif self.chat_template_source is not None:
            template = self._template(self.chat_template_source)  # compiled once, then cached
        else:
            raise EngineInputError(
                "this model has no chat template: pass chat_template, or serve with --chat-template",
                "messages",
            )
        plain = [message_dict(m, i) for i, m in enumerate(messages)]
        extra = dict(chat_template_kwargs or {})
        if documents is not None:
            extra["documents"] = documents
        try:
            return template.render(
                plain,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **extra,
            )
        except ChatTemplateError as error:
            raise EngineInputError(f"cannot render the messages: {error}", "messages") from None

    # ------------------------------------------------------------------------------ checks
    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab = self.vocab_size
        for token_id in token_ids:
            if not isinstance(token_id, int) or not 0 <= token_id < vocab:
                raise EngineInputError(
                    f"token id {token_id} is out of range for a vocabulary of {vocab}", param
                )

    def check_params(self, params: SamplingParams) -> None:
        if params.stop_token_ids:
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")

    def _checked(
        self, prompt: str | None, token_ids: list[int], params: SamplingParams | None
    ) -> EngineInput:
        if not token_ids:
            raise EngineInputError("the prompt is empty: at least one token is needed")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len)
        params = params if params is not None else SamplingParams()
        self.check_params(params)
        return EngineInput(prompt, token_ids, params)

    def _template(self, source: str) -> ChatTemplate:
        tokenizer = self.tokenizer
        return ChatTemplate(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def message_dict(message: Any, index: int) -> dict[str, Any]:
    """A message as chat templates expect it: string content (text parts joined), tool-call
    arguments as objects. ``message`` is a dict (left untouched) or a pydantic model."""
    if isinstance(message, Mapping):
        data = copy.deepcopy(dict(message))
    else:
        data = message.model_dump(exclude_none=True)
    content = data.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise EngineInputError(
                    f"content parts of type {kind!r} are not supported by this model",
                    f"messages[{index}].content",
                )
        data["content"] = "".join(texts)
    for call in data.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            with contextlib.suppress(ValueError):
                function["arguments"] = json.loads(function["arguments"])
    return data
