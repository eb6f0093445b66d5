"""OpenAI's (legacy) completions: the request, with vLLM's extra fields."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.sampling import SamplingFields

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts: a string, strings, token ids, or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self._value("max_tokens"), self.logprobs, prompt_logprobs)
