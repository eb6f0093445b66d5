"""A Python client for a ``servekit serve`` server (or any OpenAI-compatible one), shaped like LMDeploy's
``APIClient``: every call returns a generator of response dicts (one dict, or the stream's chunks).

Standard library only (``urllib``), so the client needs nothing beyond servekit's core install.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0


class APIError(RuntimeError):
    """The server answered with an error (or a stream carried one); ``message`` is the server's."""

    def __init__(self, status_code: int | None, message: str, body: Any = None) -> None:
        prefix = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(prefix + message)
        self.status_code = status_code
        self.message = message
        self.body = body


class APIConnectionError(APIError):
    """The server could not be reached."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(None, f"cannot reach the server at {url}: {reason}")
        self.url = url


def _error_message(body: Any, fallback: str) -> str:
    """The message of an OpenAI (``{"error": {"message"}}``) or core (``{"detail"}``) error body."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("detail") is not None:
            detail = body["detail"]
            return detail if isinstance(detail, str) else json.dumps(detail)
        if body.get("message"):
            return str(body["message"])
    return fallback


def iter_sse_events(stream: IO[bytes]) -> Iterator[Any]:
    """The JSON payloads of an SSE stream's ``data:`` lines, up to ``data: [DONE]``.

    A payload carrying an ``error`` (a stream that failed after its first byte) raises ``APIError``.
    """
    for raw_line in stream:
        line = raw_line.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives, the blank lines between events
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        if not data:
            continue
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
            raise APIError(None, _error_message(payload, data), payload)
        yield payload


def iter_json_lines(stream: IO[bytes]) -> Iterator[Any]:
    """The objects of a JSON-lines stream (LMDeploy's ``/v1/chat/interactive``); an error object raises."""
    for raw_line in stream:
        line = raw_line.decode("utf-8").strip()
        if not line:
            continue
        payload = json.loads(line)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            raise APIError(None, _error_message(payload, line), payload)
        yield payload


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    """Only the parameters the caller set, so the server's defaults apply to the others."""
    return {key: value for key, value in values.items() if value is not None}


class APIClient:
    """``APIClient("http://127.0.0.1:8000", api_key=None)``."""

    def __init__(
        self, server_addr: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if "://" not in server_addr:
            server_addr = "http://" + server_addr
        self.api_url = server_addr.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    # -- OpenAI endpoints -------------------------------------------------------------------------

    @property
    def available_models(self) -> list[str]:
        """The ids of the served models (``GET /v1/models``)."""
        body = self._request("GET", "/v1/models")
        return [str(model["id"]) for model in body.get("data", [])]

    def chat_completions_v1(
        self,
        model: str,
        messages: str | list[dict[str, Any]],
        temperature: float | None = None,
        top_p: float | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        n: int | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        user: str | None = None,
        repetition_penalty: float | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """``POST /v1/chat/completions``; ``messages`` may be a plain string (one user message).
        Other request fields (``tools``, ``response_format``, ``top_k``, ...) go in ``kwargs``."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload = _without_none(
            {
                "model": model,
                "messages": messages,
                "temperature": temperature,
                "top_p": top_p,
                "logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "n": n,
                "max_tokens": max_tokens,
                "stop": stop,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "user": user,
                "repetition_penalty": repetition_penalty,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "seed": seed,
                **kwargs,
            }
        )
        return self._call("/v1/chat/completions", payload, stream)

    def completions_v1(
        self,
        model: str,
        prompt: str | list[str] | list[int] | list[list[int]],
        suffix: str | None = None,
        temperature: float | None = None,
        n: int | None = None,
        max_tokens: int | None = None,
        stream: bool = False,
        top_p: float | None = None,
        top_k: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
        stop: str | list[str] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        user: str | None = None,
        repetition_penalty: float | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """``POST /v1/completions``."""
        payload = _without_none(
            {
                "model": model,
                "prompt": prompt,
                "suffix": suffix,
                "temperature": temperature,
                "n": n,
                "max_tokens": max_tokens,
                "top_p": top_p,
                "top_k": top_k,
                "logprobs": logprobs,
                "echo": echo,
                "stop": stop,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "user": user,
                "repetition_penalty": repetition_penalty,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "seed": seed,
                **kwargs,
            }
        )
        return self._call("/v1/completions", payload, stream)

    # -- native endpoints -------------------------------------------------------------------------

    def chat_interactive_v1(
        self,
        prompt: str | list[dict[str, Any]],
        session_id: int = -1,
        interactive_mode: bool = False,
        stream: bool = False,
        stop: str | list[str] | None = None,
        request_output_len: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        cancel: bool | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """``POST /v1/chat/interactive``: with ``interactive_mode`` the server keeps the session's
        history (and its KV cache) between calls; ``interactive_mode=False`` ends the session.
        ``request_output_len`` (LMDeploy's name) is sent as ``max_tokens``; streams are JSON lines."""
        payload = _without_none(
            {
                "prompt": prompt,
                "session_id": session_id,
                "interactive_mode": interactive_mode,
                "stop": stop,
                "max_tokens": request_output_len,
                "top_p": top_p,
                "top_k": top_k,
                "temperature": temperature,
                "repetition_penalty": repetition_penalty,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "cancel": cancel,
                **kwargs,
            }
        )
        return self._call("/v1/chat/interactive", payload, stream)

    def generate(
        self,
        text: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: dict[str, Any] | None = None,
        stream: bool = False,
        rid: str | list[str] | None = None,
        return_logprob: bool | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """``POST /generate`` (SGLang's native API): ``text`` or ``input_ids``, one prompt or a batch."""
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        payload = _without_none(
            {
                "text": text,
                "input_ids": input_ids,
                "sampling_params": sampling_params,
                "rid": rid,
                "return_logprob": return_logprob,
                **kwargs,
            }
        )
        return self._call("/generate", payload, stream)

    def encode(
        self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True
    ) -> tuple[list[int] | list[list[int]], int | list[int]]:
        """``POST /v1/encode`` (LMDeploy's): ``(input_ids, length)``, lists of them for a list input.
        ``do_preprocess`` applies the chat template to each input as a user message."""
        body = self._request(
            "POST", "/v1/encode", {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos}
        )
        return body["input_ids"], body["length"]

    # -- transport --------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, method: str, path: str, payload: dict[str, Any] | None) -> Any:
        url = self.api_url + path
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raw = error.read()
            error.close()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            fallback = body if isinstance(body, str) and body else error.reason
            raise APIError(error.code, _error_message(body, str(fallback)), body) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise APIConnectionError(self.api_url, str(reason)) from None

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, payload) as response:
            return json.loads(response.read())

    def _call(self, path: str, payload: dict[str, Any], stream: bool) -> Iterator[dict[str, Any]]:
        if stream:
            payload = {**payload, "stream": True}
            return self._stream(path, payload)
        return self._single(path, payload)

    def _single(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # The request is sent when the generator is first advanced, as LMDeploy's client does.
        yield self._request("POST", path, payload)

    def _stream(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._open("POST", path, payload) as response:
            content_type = response.headers.get("Content-Type", "")
            if "ndjson" in content_type or "jsonl" in content_type:
                yield from iter_json_lines(response)
            else:
                yield from iter_sse_events(response)
