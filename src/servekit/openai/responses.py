"""OpenAI response bodies and stream chunks as plain dicts (built without pydantic: they are hot)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from servekit.llm.outputs import Logprob, RequestOutput

Decode = Callable[[int], str]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def output_usage(output: RequestOutput) -> dict[str, Any]:
    generated = sum(len(c.token_ids) for c in output.outputs)
    return usage(len(output.prompt_token_ids), generated, output.num_cached_tokens)


# ------------------------------------------------------------------------------------ logprobs
def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _ranked(entry: dict[int, Logprob], limit: int) -> list[tuple[int, Logprob]]:
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None]
    ranked.sort(key=lambda item: item[1].rank or 0)
    return ranked[:limit]


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top: int, decode: Decode
) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id)
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else decode(token_id)
        content.append(
            {
                "token": text,
                "logprob": max(chosen.logprob, -9999.0) if chosen else -9999.0,
                "bytes": _token_bytes(text),
                "top_logprobs": [
                    {
                        "token": lp.decoded_token or "",
                        "logprob": max(lp.logprob, -9999.0),
                        "bytes": _token_bytes(lp.decoded_token or ""),
                    }
                    for _, lp in _ranked(entry, top)
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    top: int,
    decode: Decode,
    text_offset: int,
) -> dict[str, Any]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id) if entry else None
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else decode(token_id)
        tokens.append(text)
        token_logprobs.append(None if chosen is None else max(chosen.logprob, -9999.0))
        if entry is None:
            top_logprobs.append(None)
        else:
            best = {(lp.decoded_token or ""): max(lp.logprob, -9999.0) for _, lp in _ranked(entry, top)}
            if chosen is not None:
                best.setdefault(text, max(chosen.logprob, -9999.0))
            top_logprobs.append(best)
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


# --------------------------------------------------------------------------------------- chat
def chat_chunk(
    response_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    with_usage_field: bool,
    usage_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One chunk; with ``with_usage_field`` it has ``usage`` (null on every chunk but the last)."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if with_usage_field:
        chunk["usage"] = usage_body
    return chunk


def chat_choice_delta(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def chat_response(
    response_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_body,
    }


# --------------------------------------------------------------------------------- completions
def completion_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def completion_body(
    response_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any] | None,
    with_usage_field: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_body is not None or with_usage_field:
        body["usage"] = usage_body
    return body


class ChunkEncoder:
    """The stream chunks of one response, encoded: byte for byte what ``orjson.dumps`` writes of the
    chunk dict, with everything but the choices (id, model, created, the usage field) encoded once
    per response from ``empty``, the response's chunk with ``"choices": []``."""

    def __init__(self, empty: dict[str, Any]) -> None:
        encoded = orjson.dumps(empty)
        # Escaping makes the key unique: a string value cannot hold an unescaped quote.
        cut = encoded.index(b'"choices":[]') + len(b'"choices":[')
        self._head, self._tail = encoded[:cut], encoded[cut:]

    def encode(self, choices: list[dict[str, Any]]) -> bytes:
        """A chunk of these choices (``completion_choice`` / ``chat_choice_delta`` dicts)."""
        return self._head + b",".join(orjson.dumps(choice) for choice in choices) + self._tail


class CompletionChunks(ChunkEncoder):
    """The chunks of one ``/v1/completions`` stream; one that only carries text (nearly every
    chunk) encodes just its index and text."""

    def __init__(self, response_id: str, model: str, created: int, with_usage_field: bool) -> None:
        super().__init__(completion_body(response_id, model, created, [], None, with_usage_field))

    def text(self, index: int, text: str) -> bytes:
        """A chunk of one choice's text, not its last (no finish reason, no logprobs)."""
        return b'%s{"index":%d,"text":%s,"logprobs":null,"finish_reason":null,"stop_reason":null}%s' % (
            self._head,
            index,
            orjson.dumps(text),
            self._tail,
        )
