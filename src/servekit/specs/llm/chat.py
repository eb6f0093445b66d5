"""``/v1/chat/completions`` in the worker: render, generate, and shape OpenAI bodies or chunks."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from servekit.llm.outputs import CompletionOutput, RequestOutput
from servekit.llm.sampling_params import SamplingParams
from servekit.openai import responses as fmt
from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.errors import invalid
from servekit.openai.sse import new_id, now
from servekit.specs.llm import tools as tooling
from servekit.specs.llm.runtime import Runtime


def _with_processors(params: SamplingParams, factory: tooling.ProcessorFactory | None) -> SamplingParams:
    if factory is None:
        return params
    # One processor per sequence: grammar matchers keep per-sequence state. The engine gives every
    # sequence of a request the same params, so n > 1 with a grammar shares one processor list; the
    # processors index their state by the sequence's output tokens, which keeps them correct.
    return dataclasses.replace(params, logits_processors=[factory()])


class ChatHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.tool_parser_name = tooling.pick_tool_parser_name(
            runtime.config.tool_call_parser, runtime.model_name, runtime.inputs.chat_template_source
        )

    async def run(self, request: ChatCompletionRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        rt = self.rt
        use_tools = request.uses_tools
        factory = tooling.response_format_factory(rt.tokenizer, request)
        if use_tools:
            tool_factory = tooling.tool_choice_factory(rt.tokenizer, request, self.tool_parser_name)
            if tool_factory is not None:
                if factory is not None:
                    raise invalid(
                        "response_format cannot be combined with a forced tool_choice", "tool_choice"
                    )
                factory = tool_factory
        prepared = rt.inputs.prepare_chat(
            request.messages,
            _with_processors(request.to_sampling_params(), factory),
            tools=request.tool_dicts(),
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template=request.chat_template,
            chat_template_kwargs=request.chat_template_kwargs,
            documents=request.documents,
        )
        request_id = request.request_id or new_id("chatcmpl")
        first, stream = await rt.requests.start(request_id, prepared)
        echo = self._echo_text(request)
        try:
            if request.stream:
                n = prepared.params.n
                async for chunk in self._stream(request, n, request_id, first, stream, use_tools, echo):
                    yield chunk
            else:
                yield await self._complete(request, request_id, first, stream, use_tools, echo)
        finally:
            rt.requests.done(request_id)
            await stream.aclose()  # type: ignore[attr-defined]

    def _echo_text(self, request: ChatCompletionRequest) -> str:
        """vLLM's chat ``echo``: the last message's text is prepended when it is the assistant's."""
        if not request.echo:
            return ""
        last = request.messages[-1]
        if last.role != "assistant" or not isinstance(last.content, str):
            return ""
        return last.content

    def _choice_state(self, use_tools: bool) -> tooling.ChoiceStream:
        rt = self.rt
        reasoning = None
        if rt.config.reasoning_parser:
            reasoning = tooling.get_reasoning(rt.config.reasoning_parser).streaming()
        parser = None
        if use_tools and self.tool_parser_name:
            parser = tooling.get_tool_parser(self.tool_parser_name).streaming()
        return tooling.ChoiceStream(reasoning=reasoning, tools=parser)

    # ------------------------------------------------------------------------------ streaming
    async def _stream(
        self,
        request: ChatCompletionRequest,
        n: int,
        request_id: str,
        first: RequestOutput,
        stream: AsyncIterator[RequestOutput],
        use_tools: bool,
        echo: str,
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        rt = self.rt
        model = request.model or rt.model_name
        created = now()
        include_usage = request.include_usage
        top = request.top_logprobs or 0
        chunks = fmt.ChunkEncoder(fmt.chat_chunk(request_id, model, created, [], include_usage))
        states = [self._choice_state(use_tools) for _ in range(n)]
        finished = [False] * n
        role_delta: dict[str, Any] = {"role": "assistant", "content": echo}
        yield fmt.chat_chunk(
            request_id,
            model,
            created,
            [fmt.chat_choice_delta(i, dict(role_delta)) for i in range(n)],
            include_usage,
        )
        last: RequestOutput = first
        output: RequestOutput | None = first
        try:
            while output is not None:
                last = output
                choices = []
                for completion in output.outputs:
                    index = completion.index
                    if index >= n or finished[index]:
                        continue
                    choice = self._delta_choice(completion, states[index], top, bool(request.logprobs))
                    if choice is not None:
                        choices.append(choice)
                    if completion.finish_reason is not None:
                        finished[index] = True
                if choices:
                    yield chunks.encode(choices)
                if output.finished:
                    break
                output = await anext(stream, None)
        except asyncio.CancelledError:
            if not rt.requests.was_aborted(request_id):
                rt.counters.record_cancel()
                raise
            aborted = [fmt.chat_choice_delta(i, {}, "abort") for i in range(n) if not finished[i]]
            if aborted:
                yield fmt.chat_chunk(request_id, model, created, aborted, include_usage)
        rt.counters.record(last)
        if include_usage:
            yield fmt.chat_chunk(request_id, model, created, [], True, fmt.output_usage(last))

    def _delta_choice(
        self, completion: CompletionOutput, state: tooling.ChoiceStream, top: int, logprobs: bool
    ) -> dict[str, Any] | None:
        final = completion.finish_reason is not None
        delta = state.feed(completion.text_delta, final)
        chunk_logprobs = None
        if logprobs and completion.logprobs_delta:
            chunk_logprobs = fmt.chat_logprobs(
                completion.token_ids_delta, completion.logprobs_delta, top, self.rt.decode_token
            )
        if not delta and not final and chunk_logprobs is None:
            return None
        finish = completion.finish_reason
        if final and state.saw_tool_call and finish == "stop":
            finish = "tool_calls"
        return fmt.chat_choice_delta(
            completion.index,
            delta,
            finish,
            chunk_logprobs,
            completion.stop_reason if final else None,
        )

    # -------------------------------------------------------------------------- non-streaming
    async def _complete(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        first: RequestOutput,
        stream: AsyncIterator[RequestOutput],
        use_tools: bool,
        echo: str,
    ) -> dict[str, Any]:
        rt = self.rt
        last = await rt.final_output(request_id, first, stream)
        choices = [self._message_choice(c, request, use_tools, echo) for c in last.outputs]
        return fmt.chat_response(
            request_id, request.model or rt.model_name, now(), choices, fmt.output_usage(last)
        )

    def _message_choice(
        self, completion: CompletionOutput, request: ChatCompletionRequest, use_tools: bool, echo: str
    ) -> dict[str, Any]:
        rt = self.rt
        text = completion.text
        message: dict[str, Any] = {"role": "assistant"}
        if rt.config.reasoning_parser:
            reasoning, text = tooling.get_reasoning(rt.config.reasoning_parser).parse(text)
            message["reasoning_content"] = reasoning
        finish = completion.finish_reason or "abort"
        calls: list[Any] = []
        if use_tools and self.tool_parser_name:
            text, calls = tooling.get_tool_parser(self.tool_parser_name).parse(text)
        message["content"] = (echo + text) if (text or not calls) else None
        if calls:
            message["tool_calls"] = [tooling.tool_call_dict(-1, call) for call in calls]
            if finish == "stop":
                finish = "tool_calls"
        logprobs = None
        if request.logprobs and completion.logprobs is not None:
            logprobs = fmt.chat_logprobs(
                completion.token_ids, completion.logprobs, request.top_logprobs or 0, rt.decode_token
            )
        return {
            "index": completion.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": completion.stop_reason,
        }
