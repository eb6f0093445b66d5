"""Request fields -> ``SamplingParams``, with the checks that need the model (vocabulary, grammar).

Runs in the worker. Every failure is a ``ServerError(400)`` whose detail names the ``param``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from servekit.errors import ServerError
from servekit.llm.sampling_params import SamplingParams, SamplingParamsError
from servekit.specs.llm.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

# The fields of a request that map one-to-one onto SamplingParams when given.
_DIRECT_FIELDS = (
    "n",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
)

# Factory of one logits processor per generated sequence (grammar matchers keep per-sequence state).
ProcessorFactory = Callable[[], Any]


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ServerError:
    return ServerError(400, {"message": message, "param": param, "code": code})


def sampling_params_for(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    values: dict[str, Any] = {}
    for name in _DIRECT_FIELDS:
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    if request.stop is not None:
        values["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if request.stop_token_ids:
        _check_token_ids(request.stop_token_ids, vocab_size, "stop_token_ids")
        values["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        bias = {int(k): float(v) for k, v in request.logit_bias.items()}
        _check_token_ids(list(bias), vocab_size, "logit_bias")
        values["logit_bias"] = bias
    values["max_tokens"] = max_tokens
    values["logprobs"] = logprobs
    values["prompt_logprobs"] = prompt_logprobs
    if request.use_beam_search:
        values.setdefault("temperature", 0.0)
        if request.stream:
            raise invalid("use_beam_search does not support streaming", "stream")
    if request.best_of is not None and request.best_of > request.n and request.stream:
        raise invalid("best_of greater than n does not support streaming", "best_of")
    try:
        return SamplingParams(**values)
    except SamplingParamsError as error:
        raise invalid(str(error), error.param) from None


def chat_sampling_params(request: ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    logprobs: int | None = None
    if request.logprobs:
        logprobs = request.top_logprobs or 0
    elif request.top_logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    max_tokens = request.max_completion_tokens or request.max_tokens
    return sampling_params_for(request, max_tokens=max_tokens, logprobs=logprobs, vocab_size=vocab_size)


def completion_sampling_params(request: CompletionRequest, vocab_size: int) -> SamplingParams:
    prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
    return sampling_params_for(
        request,
        max_tokens=request.max_tokens,
        logprobs=request.logprobs,
        vocab_size=vocab_size,
        prompt_logprobs=prompt_logprobs,
    )


def native_sampling_params(fields: dict[str, Any], vocab_size: int, logprobs: int | None) -> SamplingParams:
    """``/generate``'s ``sampling_params`` object (SGLang names: max_new_tokens, stop, ...)."""
    values = dict(fields)
    if "max_new_tokens" in values:
        values["max_tokens"] = values.pop("max_new_tokens")
    values.setdefault("max_tokens", 128)
    if "min_new_tokens" in values:
        values["min_tokens"] = values.pop("min_new_tokens")
    if values.get("stop") is None:
        values.pop("stop", None)
    allowed = set(SamplingParams.__dataclass_fields__) - {"logits_processors", "logprobs", "prompt_logprobs"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise invalid(f"unknown sampling parameter {unknown[0]!r}", f"sampling_params.{unknown[0]}")
    if values.get("logit_bias"):
        try:
            values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
        except (TypeError, ValueError, AttributeError):
            raise invalid("logit_bias must map token ids to numbers", "sampling_params.logit_bias") from None
        _check_token_ids(list(values["logit_bias"]), vocab_size, "sampling_params.logit_bias")
    if values.get("stop_token_ids"):
        _check_token_ids(values["stop_token_ids"], vocab_size, "sampling_params.stop_token_ids")
    values["logprobs"] = logprobs
    try:
        return SamplingParams(**values)
    except SamplingParamsError as error:
        raise invalid(str(error), f"sampling_params.{error.param}") from None
    except TypeError as error:
        raise invalid(f"invalid sampling_params: {error}", "sampling_params") from None


def _check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise invalid(f"token id {token_id} is out of range for a vocabulary of {vocab_size}", param)
