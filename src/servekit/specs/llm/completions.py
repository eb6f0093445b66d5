"""``/v1/completions`` in the worker: one engine request per prompt, choices indexed across prompts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from servekit.llm.outputs import CompletionOutput, RequestOutput
from servekit.llm.sampling_params import SamplingParams
from servekit.specs.llm import openai_format as fmt
from servekit.specs.llm import tools as tooling
from servekit.specs.llm.params import completion_sampling_params, invalid
from servekit.specs.llm.protocol import CompletionRequest
from servekit.specs.llm.runtime import Runtime, drain, engine_error, interleave


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)  # type: ignore[arg-type]


class CompletionHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _token_ids(self, prompt: str | list[int], add_special_tokens: bool, index: int) -> list[int]:
        if isinstance(prompt, str):
            return self.rt.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        vocab = self.rt.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise invalid(f"token id {bad[0]} is out of range for a vocabulary of {vocab}", "prompt")
        return prompt

    async def run(self, request: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        rt = self.rt
        if request.suffix:
            raise invalid("suffix is not supported by this server", "suffix", code="unsupported")
        prompts = prompt_list(request.prompt)
        params = completion_sampling_params(request, rt.vocab_size)
        factory = tooling.response_format_factory(rt.tokenizer, request)
        request_id = request.request_id or fmt.new_id("cmpl")
        streams: list[AsyncIterator[RequestOutput]] = []
        firsts: list[RequestOutput] = []
        ids: list[str] = []
        try:
            for index, prompt in enumerate(prompts):
                token_ids = self._token_ids(prompt, request.add_special_tokens, index)
                prompt_params = params
                if factory is not None:
                    prompt_params = dataclasses.replace(params, logits_processors=[factory()])
                sub_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
                try:
                    first, stream = await rt.start(
                        sub_id,
                        prompt_params,
                        token_ids,
                        prompt=prompt if isinstance(prompt, str) else None,
                    )
                except Exception as error:
                    mapped = engine_error(error, "prompt")
                    if mapped is None:
                        raise
                    raise mapped from None
                ids.append(sub_id)
                firsts.append(first)
                streams.append(stream)
            if request.stream:
                async for chunk in self._stream(request, request_id, ids, firsts, streams, params):
                    yield chunk
            else:
                yield await self._complete(request, request_id, ids, firsts, streams, params)
        finally:
            for sub_id, stream in zip(ids, streams, strict=True):
                rt.done(sub_id)
                await stream.aclose()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------ streaming
    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        ids: list[str],
        firsts: list[RequestOutput],
        streams: list[AsyncIterator[RequestOutput]],
        params: SamplingParams,
    ) -> AsyncIterator[dict[str, Any]]:
        rt = self.rt
        model = request.model or rt.model_name
        created = fmt.now()
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        lasts: list[RequestOutput] = list(firsts)
        text_offsets = [0] * (len(ids) * request.n)
        merged = interleave(list(zip(firsts, streams, strict=True)))
        echoed = [False] * len(ids)
        try:
            async for position, output in merged:
                lasts[position] = output
                choices = []
                for completion in output.outputs:
                    index = position * request.n + completion.index
                    prefix = ""
                    if request.echo and not echoed[position]:
                        prefix = self._prompt_text(output)
                    choice = self._delta_choice(completion, index, prefix, text_offsets, request)
                    if choice is not None:
                        choices.append(choice)
                echoed[position] = True
                if choices:
                    yield fmt.completion_body(request_id, model, created, choices, None, include_usage)
        except asyncio.CancelledError:
            if not any(rt.was_aborted(i) for i in ids):
                rt.record_cancel()
                raise
        finally:
            await merged.aclose()
        for last in lasts:
            rt.record(last)
        if include_usage:
            yield fmt.completion_body(request_id, model, created, [], self._usage(lasts))

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.rt.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)

    def _delta_choice(
        self,
        completion: CompletionOutput,
        index: int,
        prefix: str,
        text_offsets: list[int],
        request: CompletionRequest,
    ) -> dict[str, Any] | None:
        final = completion.finish_reason is not None
        logprobs = None
        if request.logprobs is not None and completion.logprobs_delta:
            logprobs = fmt.completion_logprobs(
                completion.token_ids_delta,
                list(completion.logprobs_delta),
                request.logprobs,
                self.rt.decode_token,
                text_offsets[index] + len(prefix),
            )
        text = prefix + completion.text_delta
        text_offsets[index] += len(text)
        if not text and not final and logprobs is None:
            return None
        return fmt.completion_choice(
            index, text, completion.finish_reason, logprobs, completion.stop_reason if final else None
        )

    # -------------------------------------------------------------------------- non-streaming
    async def _complete(
        self,
        request: CompletionRequest,
        request_id: str,
        ids: list[str],
        firsts: list[RequestOutput],
        streams: list[AsyncIterator[RequestOutput]],
        params: SamplingParams,
    ) -> dict[str, Any]:
        rt = self.rt

        try:
            lasts = list(await asyncio.gather(*(drain(f, s) for f, s in zip(firsts, streams, strict=True))))
        except asyncio.CancelledError:
            if not any(rt.was_aborted(i) for i in ids):
                rt.record_cancel()
                raise
            lasts = firsts
        choices = []
        for position, last in enumerate(lasts):
            rt.record(last)
            for completion in last.outputs:
                choices.append(
                    self._choice(last, completion, position * request.n + completion.index, request)
                )
        return fmt.completion_body(
            request_id, request.model or rt.model_name, fmt.now(), choices, self._usage(lasts)
        )

    def _choice(
        self, output: RequestOutput, completion: CompletionOutput, index: int, request: CompletionRequest
    ) -> dict[str, Any]:
        text = completion.text
        logprobs = None
        prompt_text = self._prompt_text(output) if request.echo else ""
        if request.logprobs is not None:
            token_ids: list[int] = []
            entries: list[Any] = []
            if request.echo:
                token_ids += output.prompt_token_ids
                entries += list(output.prompt_logprobs or [None] * len(output.prompt_token_ids))
            token_ids += completion.token_ids
            entries += list(completion.logprobs or [])
            logprobs = fmt.completion_logprobs(token_ids, entries, request.logprobs, self.rt.decode_token, 0)
        return fmt.completion_choice(
            index, prompt_text + text, completion.finish_reason or "abort", logprobs, completion.stop_reason
        )

    @staticmethod
    def _usage(lasts: list[RequestOutput]) -> dict[str, Any]:
        prompt = sum(len(o.prompt_token_ids) for o in lasts)
        generated = sum(len(c.token_ids) for o in lasts for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in lasts)
        return fmt.usage(prompt, generated, cached)
