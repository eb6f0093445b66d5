"""The errors the engine API raises for requests it cannot take (no torch: the HTTP side maps them)."""

from __future__ import annotations


class EngineInputError(ValueError):
    """A request the engine refuses: ``param`` names the input at fault in the engine's terms
    (``prompt``, ``messages[1].content``, ``chat_template``, a ``SamplingParams`` field, ...)."""

    def __init__(self, message: str, param: str | None = "prompt", code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class SamplingParamsError(EngineInputError):
    """An invalid sampling parameter; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param)


class PromptTooLongError(EngineInputError):
    """The prompt does not fit the model's context (``max_model_len``)."""

    def __init__(self, prompt_len: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens (at least one token must be left for the output).",
            "prompt",
            "context_length_exceeded",
        )
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


class QueueFullError(RuntimeError):
    """Too many requests are already waiting (``max_queued_requests``)."""


class EngineClosedError(RuntimeError):
    """The engine was shut down (or its loop died) before the request finished."""
