"""``/v1/completions`` in the worker: one engine request per prompt, choices indexed across prompts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from servekit.llm.outputs import CompletionOutput, RequestOutput
from servekit.llm.sampling_params import SamplingParams
from servekit.openai import responses as fmt
from servekit.openai.completions import CompletionRequest
from servekit.openai.errors import invalid
from servekit.openai.sse import new_id, now
from servekit.specs.llm import tools as tooling
from servekit.specs.llm.requests import drain, interleave
from servekit.specs.llm.runtime import Runtime


class CompletionHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def run(self, request: CompletionRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        """The response (a dict), or its stream chunks: JSON bytes, or a dict for the usage chunk."""
        rt = self.rt
        if request.suffix:
            raise invalid("suffix is not supported by this server", "suffix", code="unsupported")
        prompts = request.prompts()
        params = request.to_sampling_params()
        factory = tooling.response_format_factory(rt.tokenizer, request)
        request_id = request.request_id or new_id("cmpl")
        streams: list[AsyncIterator[RequestOutput]] = []
        firsts: list[RequestOutput] = []
        ids: list[str] = []
        try:
            for index, prompt in enumerate(prompts):
                prompt_params = params
                if factory is not None:
                    prompt_params = dataclasses.replace(params, logits_processors=[factory()])
                text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
                prepared = rt.inputs.prepare(
                    text, prompt_params, token_ids, add_special_tokens=request.add_special_tokens
                )
                sub_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
                first, stream = await rt.requests.start(sub_id, prepared)
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
                rt.requests.done(sub_id)
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
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        rt = self.rt
        model = request.model or rt.model_name
        created = now()
        include_usage = request.include_usage
        chunks = fmt.CompletionChunks(request_id, model, created, include_usage)
        lasts: list[RequestOutput] = list(firsts)
        text_offsets = [0] * (len(ids) * params.n)
        merged = interleave(list(zip(firsts, streams, strict=True)))
        echoed = [False] * len(ids)
        try:
            async for position, output in merged:
                lasts[position] = output
                if len(output.outputs) == 1 and echoed[position]:
                    completion = output.outputs[0]
                    if completion.finish_reason is None and not completion.logprobs_delta:
                        # The usual chunk: one choice's new text, encoded on its template.
                        if completion.text_delta:
                            index = position * params.n + completion.index
                            text_offsets[index] += len(completion.text_delta)
                            yield chunks.text(index, completion.text_delta)
                        continue
                choices = []
                for completion in output.outputs:
                    index = position * params.n + completion.index
                    prefix = ""
                    if request.echo and not echoed[position]:
                        prefix = self._prompt_text(output)
                    choice = self._delta_choice(completion, index, prefix, text_offsets, request)
                    if choice is not None:
                        choices.append(choice)
                echoed[position] = True
                if choices:
                    yield chunks.encode(choices)
        except asyncio.CancelledError:
            if not any(rt.requests.was_aborted(i) for i in ids):
                rt.counters.record_cancel()
                raise
        finally:
            await merged.aclose()
        for last in lasts:
            rt.counters.record(last)
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
            if not any(rt.requests.was_aborted(i) for i in ids):
                rt.counters.record_cancel()
                raise
            lasts = firsts
        choices = []
        for position, last in enumerate(lasts):
            rt.counters.record(last)
            for completion in last.outputs:
                choices.append(
                    self._choice(last, completion, position * params.n + completion.index, request)
                )
        return fmt.completion_body(
            request_id, request.model or rt.model_name, now(), choices, self._usage(lasts)
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
