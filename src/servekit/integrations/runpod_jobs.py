"""RunPod job inputs, validated once: the worker-vllm forms (``prompt``/``messages`` with
``sampling_params``; ``openai_route`` + ``openai_input``; the newer ``route``/``body``/``method``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.errors import OpenAIError, invalid
from servekit.specs.llm.protocol import GenerateRequest

# worker-vllm's sampling_params table: vLLM's SamplingParams defaults (max_tokens 16, temperature 1.0).
NATIVE_MAX_TOKENS = 16
OPENAI_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/models": "models",
}


@dataclass(frozen=True)
class Batching:
    """Dynamic stream batching: the first chunk has ``min_size`` tokens, each next one ``growth``
    times more, up to ``max_size`` (1, 3, 9, 27, 50, 50, ... with the defaults)."""

    max_size: int
    min_size: int
    growth: float

    def sizes(self) -> Iterator[int]:
        size = float(self.min_size)
        while True:
            yield min(int(size), self.max_size)
            size = min(size * self.growth, float(self.max_size))


@dataclass(frozen=True)
class OpenAIJob:
    kind: str  # "chat", "completion" or "models"
    body: dict[str, Any]


@dataclass(frozen=True)
class NativeJob:
    prompt: str | None
    messages: list[Any] | None
    params: SamplingParams
    stream: bool


def parse_job(job_input: Any) -> OpenAIJob | NativeJob:
    if not isinstance(job_input, Mapping):
        raise invalid("the job input must be an object", "input")
    if "openai_route" in job_input:
        return _openai_job(
            job_input["openai_route"], job_input.get("openai_input"), "openai_route", "GET|POST"
        )
    if "route" in job_input:
        method = str(job_input.get("method") or "POST").upper()
        return _openai_job(job_input["route"], job_input.get("body"), "route", method)
    return _native_job(job_input)


def _openai_job(route: Any, body: Any, route_param: str, method: str) -> OpenAIJob:
    kind = OPENAI_ROUTES.get(str(route).rstrip("/"))
    if kind is None:
        raise invalid(f"unknown route {route!r}; routes: {', '.join(OPENAI_ROUTES)}", route_param)
    expected = "GET" if kind == "models" else "POST"
    if method not in (expected, "GET|POST"):
        raise invalid(f"{route} takes {expected}, got {method}", "method")
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise invalid(
            "the request body must be an object", "openai_input" if route_param == "openai_route" else "body"
        )
    return OpenAIJob(kind, dict(body))


def _native_job(job_input: Mapping[str, Any]) -> NativeJob:
    messages = job_input.get("messages")
    prompt = job_input.get("prompt")
    if messages is None and prompt is None:
        raise invalid("the job needs a prompt or messages (or an openai_route)", "prompt")
    if messages is not None and not isinstance(messages, list):
        raise invalid("messages must be a list of {role, content} objects", "messages")
    if messages is None and not isinstance(prompt, str):
        raise invalid("prompt must be a string", "prompt")
    if messages is None and bool(job_input.get("apply_chat_template", False)):
        messages = [{"role": "user", "content": prompt}]
    sampling = job_input.get("sampling_params") or {}
    if not isinstance(sampling, Mapping):
        raise invalid("sampling_params must be an object", "sampling_params")
    try:
        request = GenerateRequest.model_validate(
            {"sampling_params": {"max_tokens": NATIVE_MAX_TOKENS, **sampling}}
        )
    except ValidationError as error:  # names the parameter: sampling_params.<name>
        raise OpenAIError.from_validation_error(error) from None
    return NativeJob(
        prompt=None if messages is not None else prompt,
        messages=messages,
        params=request.to_sampling_params(),
        stream=bool(job_input.get("stream", False)),
    )


def batching(job_input: Mapping[str, Any], max_size: int, min_size: int, growth: float) -> Batching:
    """The job's batching, its fields over the worker's defaults; invalid values name the field."""
    values = {"max_batch_size": max_size, "min_batch_size": min_size, "batch_size_growth_factor": growth}
    for name in values:
        given = job_input.get(name)
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, int | float) or given < 1:
            raise invalid(f"{name} must be a number of at least 1, got {given!r}", name)
        values[name] = given
    return Batching(
        int(values["max_batch_size"]),
        int(values["min_batch_size"]),
        float(values["batch_size_growth_factor"]),
    )
