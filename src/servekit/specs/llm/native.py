"""The native routes in the worker: SGLang-style ``/generate``, ``/tokenize``, ``/detokenize``, and
LMDeploy's ``/v1/encode``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from servekit.llm.outputs import CompletionOutput, RequestOutput
from servekit.openai.errors import invalid
from servekit.specs.llm.protocol import DetokenizeRequest, EncodeRequest, GenerateRequest, TokenizeRequest
from servekit.specs.llm.requests import interleave
from servekit.specs.llm.runtime import Runtime


def _finish_reason(completion: CompletionOutput) -> dict[str, Any] | None:
    if completion.finish_reason is None:
        return None
    reason: dict[str, Any] = {"type": completion.finish_reason}
    if completion.stop_reason is not None:
        reason["matched"] = completion.stop_reason
    elif completion.finish_reason == "length":
        reason["length"] = len(completion.token_ids)
    return reason


class GenerateHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _rids(self, request: GenerateRequest, count: int) -> list[str]:
        rid = request.rid
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        rids = [rid] if isinstance(rid, str) else list(rid)
        if len(rids) != count:
            raise invalid(f"rid has {len(rids)} ids for {count} prompts", "rid")
        return rids

    async def run(self, request: GenerateRequest) -> AsyncIterator[Any]:
        rt = self.rt
        prompts = request.prompts()
        if not prompts:
            raise invalid("no prompt given", "text")
        params = request.to_sampling_params()
        rids = self._rids(request, len(prompts))
        started: list[tuple[str, RequestOutput, AsyncIterator[RequestOutput]]] = []
        try:
            for rid, (text, token_ids) in zip(rids, prompts, strict=True):
                first, stream = await rt.requests.start(rid, rt.inputs.prepare(text, params, token_ids))
                started.append((rid, first, stream))
            batched = request.batched
            if request.stream:
                async for item in self._stream(started, batched, request):
                    yield item
            else:
                results = await asyncio.gather(*(self.rt.final_output(rid, f, s) for rid, f, s in started))
                bodies = [self._body(rid, out, request) for rid, out in zip(rids, results, strict=True)]
                yield bodies if batched else bodies[0]
        finally:
            for rid, _, stream in started:
                rt.requests.done(rid)
                await stream.aclose()  # type: ignore[attr-defined]

    async def _stream(
        self,
        started: list[tuple[str, RequestOutput, AsyncIterator[RequestOutput]]],
        batched: bool,
        request: GenerateRequest,
    ) -> AsyncIterator[Any]:
        merged = interleave([(first, stream) for _, first, stream in started])
        lasts = [first for _, first, _ in started]
        try:
            async for position, output in merged:
                lasts[position] = output
                body = self._body(started[position][0], output, request)
                if batched:
                    body["index"] = position
                yield body
        except asyncio.CancelledError:
            rid = next((r for r, _, _ in started if self.rt.requests.was_aborted(r)), None)
            if rid is None:
                self.rt.counters.record_cancel()
                raise
            for position, (rid, _, _) in enumerate(started):
                if not lasts[position].finished:
                    body = self._body(rid, lasts[position], request)
                    body["meta_info"]["finish_reason"] = {"type": "abort"}
                    yield body
        finally:
            await merged.aclose()
        for last in lasts:
            self.rt.counters.record(last)

    def _body(self, rid: str, output: RequestOutput, request: GenerateRequest) -> dict[str, Any]:
        completion = output.outputs[0]
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": _finish_reason(completion) if output.finished else None,
            "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": len(completion.token_ids),
            "cached_tokens": output.num_cached_tokens,
        }
        if request.return_logprob and completion.logprobs is not None:
            meta["output_token_logprobs"] = [
                [entry[tid].logprob if tid in entry else None, tid, self.rt.decode_token(tid)]
                for tid, entry in zip(completion.token_ids, completion.logprobs, strict=False)
            ]
            if request.top_logprobs_num:
                meta["output_top_logprobs"] = [
                    [
                        [lp.logprob, tid, lp.decoded_token]
                        for tid, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 10**9)
                        if lp.rank is not None
                    ]
                    for entry in completion.logprobs
                ]
        return {"text": completion.text, "output_ids": list(completion.token_ids), "meta_info": meta}


def tokenize(rt: Runtime, request: TokenizeRequest) -> dict[str, Any]:
    if request.messages is not None:
        tokens = rt.inputs.chat_token_ids(
            request.messages, add_generation_prompt=request.add_generation_prompt
        )
    elif request.prompt is not None:
        tokens = rt.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    else:
        raise invalid("either prompt or messages is required", "prompt")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": rt.max_model_len}


def detokenize(rt: Runtime, request: DetokenizeRequest) -> dict[str, Any]:
    rt.inputs.check_token_ids(request.tokens, "tokens")
    return {"prompt": rt.tokenizer.decode(request.tokens, skip_special_tokens=False)}


def encode(rt: Runtime, request: EncodeRequest) -> dict[str, Any]:
    """LMDeploy's ``/v1/encode``: ids and length for a string, lists of them for a list."""
    texts = [request.input] if isinstance(request.input, str) else request.input
    encoded = [_encode_one(rt, text, bool(request.do_preprocess), bool(request.add_bos)) for text in texts]
    if isinstance(request.input, str):
        return {"input_ids": encoded[0], "length": len(encoded[0])}
    return {"input_ids": encoded, "length": [len(ids) for ids in encoded]}


def _encode_one(rt: Runtime, text: str, do_preprocess: bool, add_bos: bool) -> list[int]:
    if do_preprocess:
        ids = rt.inputs.chat_token_ids([{"role": "user", "content": text}])
    else:
        ids = rt.tokenizer.encode(text, add_special_tokens=False)
    bos = rt.tokenizer.bos_token_id
    starts_with_bos = bos is not None and ids[:1] == [bos]
    if add_bos and bos is not None and not starts_with_bos:
        return [bos, *ids]
    if not add_bos and starts_with_bos:
        return ids[1:]
    return ids
