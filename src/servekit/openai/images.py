"""OpenAI's image generation API: the request and response bodies of ``POST /v1/images/generations``."""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SIDE = 4096
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations``; reads as attributes or as a mapping
    (``request.prompt`` or ``request["prompt"]``, extras included)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["url", "b64_json"] | None = "url"
    output_format: Literal["png"] | None = "png"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Filled by the spec from ``size`` (or its default size when ``size`` is "auto").
    width: int = 0
    height: int = 0

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        match = _SIZE.match(value)
        if match is None:
            raise ValueError("size must be 'auto' or 'WIDTHxHEIGHT', like '1024x1024'")
        width, height = int(match[1]), int(match[2])
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"each side of size must be between 1 and {MAX_SIDE} pixels")
        return value

    # ``predict`` gets this request; users index it as a dict as often as they read attributes.
    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        extra = self.model_extra or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in type(self).model_fields or key in (self.model_extra or {}))

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return [*type(self).model_fields, *(self.model_extra or {})]


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]


def parse_size(size: str) -> tuple[int, int]:
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"invalid size {size!r}")
    return int(match[1]), int(match[2])
