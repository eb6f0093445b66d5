"""Interactive chat sessions (``/v1/chat/interactive``), kept in the HTTP front.

The front keeps each session's messages and sends the whole conversation with every turn, always to
the same worker (the spec pins a session to one by affinity); that worker's prefix cache then finds
the KV blocks of the earlier turns, so only the new turn is computed. Each reply says how many
prompt tokens came from the cache (``cached_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.errors import OpenAIError, invalid
from servekit.openai.sse import new_id
from servekit.openai.types import ChatMessage, StreamOptions
from servekit.specs.llm.protocol import InteractiveRequest


@dataclass
class Session:
    messages: list[dict[str, Any]] = field(default_factory=list)
    busy_request: str | None = None
    history_tokens: int = 0


@dataclass
class Turn:
    session_id: int
    interactive: bool
    new_messages: list[dict[str, Any]]
    history: list[dict[str, Any]]
    request_id: str
    history_tokens: int
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def chat_request(self, body: InteractiveRequest) -> ChatCompletionRequest:
        messages = [ChatMessage.model_validate(m) for m in self.history + self.new_messages]
        try:
            return self._chat_request(messages, body)
        except ValidationError as error:  # a bound of chat's the interactive fields do not share
            raise OpenAIError.from_validation_error(error) from None

    def _chat_request(self, messages: list[ChatMessage], body: InteractiveRequest) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate(
            {
                "messages": messages,
                "stream": body.stream,
                "stream_options": StreamOptions(include_usage=True) if body.stream else None,
                "max_tokens": body.max_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "top_k": body.top_k,
                "repetition_penalty": body.repetition_penalty,
                "stop": body.stop,
                "ignore_eos": body.ignore_eos,
                "skip_special_tokens": body.skip_special_tokens,
                "seed": body.seed,
                "request_id": self.request_id,
            }
        )


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}

    def count(self) -> int:
        return len(self._sessions)

    def exists(self, session_id: int) -> bool:
        return session_id in self._sessions

    def running_request(self, session_id: int) -> str | None:
        session = self._sessions.get(session_id)
        return None if session is None else session.busy_request

    def end(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def begin(self, body: InteractiveRequest) -> Turn:
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise invalid("prompt must not be empty", "prompt")
            new = [{"role": "user", "content": body.prompt}]
        else:
            new = [m.model_dump(exclude_none=True) for m in body.prompt]
            if not new:
                raise invalid("prompt must not be empty", "prompt")
        interactive = body.interactive_mode and body.session_id >= 0
        session = self._sessions.get(body.session_id) if interactive else None
        if session is not None and session.busy_request is not None:
            raise invalid(
                f"session {body.session_id} is busy with another request", "session_id", code="session_busy"
            )
        if interactive and session is None:
            session = self._sessions[body.session_id] = Session()
        request_id = new_id("interactive")
        if session is not None:
            session.busy_request = request_id
        return Turn(
            session_id=body.session_id,
            interactive=interactive,
            new_messages=new,
            history=list(session.messages) if session is not None else [],
            request_id=request_id,
            history_tokens=session.history_tokens if session is not None else 0,
        )

    def abandon(self, turn: Turn) -> None:
        session = self._sessions.get(turn.session_id)
        if session is not None and session.busy_request == turn.request_id:
            session.busy_request = None

    def _commit(self, turn: Turn) -> None:
        session = self._sessions.get(turn.session_id)
        if session is None or not turn.interactive or session.busy_request != turn.request_id:
            return
        session.busy_request = None
        if turn.finish_reason == "abort":
            return  # a cancelled turn leaves the conversation as it was
        session.messages = turn.history + turn.new_messages + [{"role": "assistant", "content": turn.text}]
        if turn.usage is not None:
            session.history_tokens = int(turn.usage["total_tokens"])

    def complete(self, turn: Turn, response: dict[str, Any]) -> dict[str, Any]:
        choice = response["choices"][0]
        turn.text = choice["message"].get("content") or ""
        turn.finish_reason = choice["finish_reason"]
        turn.usage = response.get("usage")
        self._commit(turn)
        return {"text": turn.text, **self._totals(turn)}

    @staticmethod
    def _totals(turn: Turn) -> dict[str, Any]:
        usage = turn.usage or {}
        return {
            "tokens": usage.get("completion_tokens", 0),
            "input_tokens": usage.get("prompt_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "history_tokens": turn.history_tokens,
            "finish_reason": turn.finish_reason,
            "session_id": turn.session_id,
        }

    def stream_items(self, turn: Turn, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """LMDeploy-style stream lines for one chat chunk."""
        if "error" in chunk:
            return [chunk]
        if chunk.get("usage"):
            turn.usage = chunk["usage"]
            return [{"text": "", **self._totals(turn)}]
        lines = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content") or ""
            turn.text += delta
            if choice.get("finish_reason") is not None:
                turn.finish_reason = choice["finish_reason"]
            if delta or choice.get("finish_reason") is not None:
                lines.append(
                    {
                        "text": delta,
                        "tokens": None,
                        "finish_reason": choice.get("finish_reason"),
                        "session_id": turn.session_id,
                    }
                )
        return lines

    def finish_stream(self, turn: Turn) -> None:
        self._commit(turn)
