"""servekit as a LiteLLM custom provider: ``litellm.completion(model="servekit/<model>", ...)``.

    import litellm
    from servekit.integrations.litellm import handler

    litellm.custom_provider_map = [{"provider": "servekit", "custom_handler": handler}]
    litellm.completion(model="servekit/tiny-llama", messages=[...], api_base="http://127.0.0.1:8000")

With an ``api_base`` (the call's, the handler's, or ``SERVEKIT_API_BASE``) requests go to that running
servekit server (its root URL or its ``/v1`` URL), with ``api_key`` (or ``SERVEKIT_API_KEY``) as a
bearer token. Without one, ``<model>`` is loaded in this process, once (what ``servekit serve``
takes: a checkpoint directory, a ``.gguf`` file, a hub id, or ``default``), with the engine settings
of ``servekit serve``'s env vars and the handler's ``engine_options``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import httpx
from litellm import CustomLLM, EmbeddingResponse, ImageResponse, ModelResponse
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.llms.openai import ChatCompletionUsageBlock
from litellm.types.utils import GenericStreamingChunk

from servekit.integrations.backends import Backend, LocalServers, RemoteBackend, Timeout
from servekit.integrations.portal import Portal
from servekit.openai.errors import OpenAIError

__all__ = ["CustomLLMError", "ServekitLLM", "handler"]

_DEFAULT_TIMEOUT_S = 600.0


class ServekitLLM(CustomLLM):
    def __init__(
        self,
        api_base: str | None = None,
        api_key: str | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        timeout: float = _DEFAULT_TIMEOUT_S,
    ) -> None:
        """``api_base``/``api_key``: the default server (else ``SERVEKIT_API_BASE``/``SERVEKIT_API_KEY``,
        read at each call). ``engine_options``: ``servekit serve`` settings for in-process models
        (``{"max_model_len": 2048, "quantization": "int8"}``)."""
        super().__init__()
        self.api_base = api_base
        self.api_key = api_key
        self.timeout = timeout
        self._local = LocalServers(engine_options)
        self._portal = Portal("servekit-litellm")

    def loaded_models(self) -> list[str]:
        """The models loaded in this process so far."""
        return self._local.models()

    def shutdown(self) -> None:
        """Stop the engines of the in-process models."""
        self._local.shutdown()

    # -------------------------------------------------------------------------------- backends
    def _remote(self, api_base: str | None, api_key: str | None, timeout: Timeout) -> RemoteBackend | None:
        base = api_base or self.api_base or os.environ.get("SERVEKIT_API_BASE")
        if not base:
            return None
        key = api_key or self.api_key or os.environ.get("SERVEKIT_API_KEY")
        return RemoteBackend(base, key, timeout if timeout is not None else self.timeout)

    async def _backend(
        self, model: str, api_base: str | None, api_key: str | None, timeout: Timeout
    ) -> Backend:
        remote = self._remote(api_base, api_key, timeout)
        if remote is not None:
            return remote
        return await asyncio.to_thread(self._local.get, model)  # loading must not block the loop

    # ------------------------------------------------------------------------------------- chat
    def completion(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ModelResponse:
        return self._portal.call(self._complete(model, messages, api_base, api_key, optional_params, timeout))

    async def acompletion(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ModelResponse:
        return await self._complete(model, messages, api_base, api_key, optional_params, timeout)

    def streaming(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> Iterator[GenericStreamingChunk]:
        stream = self._stream(model, messages, api_base, api_key, optional_params, timeout)
        return self._portal.iterate(stream)

    async def astreaming(  # type: ignore[override]  # an async generator, as LiteLLM calls it
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: dict[str, Any] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> AsyncIterator[GenericStreamingChunk]:
        async for chunk in self._stream(model, messages, api_base, api_key, optional_params, timeout):
            yield chunk

    async def _complete(
        self,
        model: str,
        messages: list[Any],
        api_base: str | None,
        api_key: str | None,
        optional_params: dict[str, Any],
        timeout: Timeout,
    ) -> ModelResponse:
        body = chat_body(model, messages, optional_params)
        with _as_litellm_errors():
            backend = await self._backend(model, api_base, api_key, timeout)
            reply = await backend.chat(body)
        return ModelResponse(**reply)

    async def _stream(
        self,
        model: str,
        messages: list[Any],
        api_base: str | None,
        api_key: str | None,
        optional_params: dict[str, Any],
        timeout: Timeout,
    ) -> AsyncIterator[GenericStreamingChunk]:
        body = chat_body(model, messages, optional_params)
        body["stream_options"] = {"include_usage": True}
        with _as_litellm_errors():
            backend = await self._backend(model, api_base, api_key, timeout)
            async for chunk in generic_chunks(backend.chat_stream(body)):
                yield chunk

    # ------------------------------------------------------------------------------- embeddings
    def embedding(
        self,
        model: str,
        input: list[Any],
        model_response: EmbeddingResponse,
        print_verbose: Callable[..., Any],
        logging_obj: Any,
        optional_params: dict[str, Any],
        api_key: str | None = None,
        api_base: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        litellm_params: Any = None,
    ) -> EmbeddingResponse:
        return self._portal.call(self._embed(model, input, api_base, api_key, optional_params, timeout))

    async def aembedding(
        self,
        model: str,
        input: list[Any],
        model_response: EmbeddingResponse,
        print_verbose: Callable[..., Any],
        logging_obj: Any,
        optional_params: dict[str, Any],
        api_key: str | None = None,
        api_base: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        litellm_params: Any = None,
    ) -> EmbeddingResponse:
        return await self._embed(model, input, api_base, api_key, optional_params, timeout)

    async def _embed(
        self,
        model: str,
        input: list[Any],
        api_base: str | None,
        api_key: str | None,
        optional_params: dict[str, Any],
        timeout: Timeout,
    ) -> EmbeddingResponse:
        body = {**openai_params(optional_params), "model": model, "input": input}
        with _as_litellm_errors():
            backend = await self._backend(model, api_base, api_key, timeout)
            reply = await backend.embeddings(body)
        return EmbeddingResponse(**reply)

    # ----------------------------------------------------------------------------------- images
    def image_generation(
        self,
        model: str,
        prompt: str,
        api_key: str | None,
        api_base: str | None,
        model_response: ImageResponse,
        optional_params: dict[str, Any],
        logging_obj: Any,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ImageResponse:
        return self._portal.call(self._image(model, prompt, api_base, api_key, optional_params, timeout))

    async def aimage_generation(
        self,
        model: str,
        prompt: str,
        model_response: ImageResponse,
        api_key: str | None,
        api_base: str | None,
        optional_params: dict[str, Any],
        logging_obj: Any,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ImageResponse:
        return await self._image(model, prompt, api_base, api_key, optional_params, timeout)

    async def _image(
        self,
        model: str,
        prompt: str,
        api_base: str | None,
        api_key: str | None,
        optional_params: dict[str, Any],
        timeout: Timeout,
    ) -> ImageResponse:
        body = {**openai_params(optional_params), "model": model, "prompt": prompt}
        with _as_litellm_errors():
            backend = await self._backend(model, api_base, api_key, timeout)
            reply = await backend.images(body)
        return ImageResponse(**reply)


# ------------------------------------------------------------------------------------ helpers
def openai_params(optional_params: Mapping[str, Any]) -> dict[str, Any]:
    """LiteLLM's ``optional_params`` as OpenAI body fields: ``extra_body`` merged in, nulls dropped."""
    params = {k: v for k, v in optional_params.items() if v is not None and k != "extra_body"}
    params.update(optional_params.get("extra_body") or {})
    return params


def chat_body(model: str, messages: list[Any], optional_params: Mapping[str, Any]) -> dict[str, Any]:
    return {**openai_params(optional_params), "model": model, "messages": messages}


async def generic_chunks(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[GenericStreamingChunk]:
    """OpenAI chat chunks as LiteLLM's ``GenericStreamingChunk``s: text and tool-call deltas as they
    come, then one last chunk with ``is_finished``, the finish reason and the usage."""
    finish_reason = "stop"
    usage: ChatCompletionUsageBlock | None = None
    async for chunk in chunks:
        if chunk.get("usage"):
            reported = chunk["usage"]
            usage = ChatCompletionUsageBlock(
                prompt_tokens=int(reported.get("prompt_tokens") or 0),
                completion_tokens=int(reported.get("completion_tokens") or 0),
                total_tokens=int(reported.get("total_tokens") or 0),
            )
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            calls = delta.get("tool_calls") or [None]
            for position, call in enumerate(calls):
                piece = text if position == 0 else ""
                if piece or call is not None:
                    yield GenericStreamingChunk(
                        text=piece,
                        tool_use=call,
                        is_finished=False,
                        finish_reason="",
                        usage=None,
                        index=int(choice.get("index", 0)),
                    )
    yield GenericStreamingChunk(
        text="", tool_use=None, is_finished=True, finish_reason=finish_reason, usage=usage, index=0
    )


@contextlib.contextmanager
def _as_litellm_errors() -> Iterator[None]:
    """servekit's errors (with the server's status) as LiteLLM's ``CustomLLMError``."""
    try:
        yield
    except OpenAIError as error:
        raise CustomLLMError(status_code=error.status_code, message=error.message) from error


handler = ServekitLLM()
