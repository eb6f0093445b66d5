"""OpenAI's embeddings API: the request and response bodies of ``POST /v1/embeddings``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: str = ""
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, str):
            if not value:
                raise ValueError("the input must not be an empty string")
            return value
        if not value:
            raise ValueError("the input must not be an empty list")
        for item in value:
            if (isinstance(item, str | list)) and not item:
                raise ValueError("the input must not contain empty strings or empty token arrays")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: one string or one token array per embedding to compute."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):
            return [value]  # one token array
        return value

    def get_num_items(self) -> int:
        return len(self.inputs())

    def token_count(self) -> int:
        """Tokens sent as token arrays (0 for text inputs, whose tokens only the model can count)."""
        return sum(len(item) for item in self.inputs() if isinstance(item, list))


class Embedding(BaseModel):
    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


UsageInfo = EmbeddingUsage


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
