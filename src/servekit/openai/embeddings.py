"""OpenAI's embeddings API: the request and response bodies of ``POST /v1/embeddings``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from servekit.openai.completions import Prompt

# Non-empty, as /openapi.json says: no empty string, token array, or list of them.
EmbeddingInput = Prompt


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: str = ""
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

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
