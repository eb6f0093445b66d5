"""OpenAI's (legacy) completions: the request, with vLLM's extra fields."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.sampling import SamplingFields, TokenId

Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# Non-empty: no text, no token array and no list of them may be empty.
Prompt = (
    Text
    | Annotated[list[Text], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    add_special_tokens: bool = True

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
