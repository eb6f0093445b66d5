"""Ready-made APIs for ``OpenAISpec``, with the names and behaviours of LitServe's test examples."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from servekit.api import LitAPI
from servekit.openai import ChatMessage

_GREETING = [
    "Hi!",
    "It's",
    "nice",
    "to",
    "meet",
    "you.",
    "Is",
    "there",
    "something",
    "I",
    "can",
    "help",
    "you",
    "with",
    "or",
    "would",
    "you",
    "like",
    "to",
    "chat?",
]
_USAGE = {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
_SUM = "10 + 6 is equal to 16."


class TestAPI(LitAPI):
    """Always answers "This is a generated output"."""

    __test__ = False  # not a pytest test class

    def setup(self, device: str) -> None:
        self.model = None

    def predict(self, x: Any, **kwargs: Any) -> Iterator[str]:
        yield "This is a generated output"


class TestAPIWithCustomEncode(TestAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> Iterator[ChatMessage]:
        yield ChatMessage(role="assistant", content="This is a custom encoded output")


class TestAPIWithToolCalls(TestAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> Iterator[ChatMessage]:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "function_1", "arguments": '{"arg_1": "arg_1_value"}'},
        }
        yield ChatMessage(role="assistant", content="", tool_calls=[call])  # type: ignore[list-item]


class TestAPIWithStructuredOutput(TestAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> Iterator[ChatMessage]:
        content = '{"name": "Science Fair", "date": "Friday", "participants": ["Alice", "Bob"]}'
        yield ChatMessage(role="assistant", content=content)


class OpenAIBatchContext(LitAPI):
    """Batched and streamed: each step of ``predict`` is one word for every request of the batch, and
    ``encode_response`` turns each step into one message per request (LitServe's batched-streaming
    contract). Sets ``temperature`` in every request's context and checks it after the stream."""

    def setup(self, device: str) -> None:
        self.model = None

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: Any, context: Any = None, **kwargs: Any) -> Iterator[list[str]]:
        for request_context in context:
            request_context["temperature"] = 1.0
        for word in _GREETING:
            yield [word + " "] * len(x)

    def unbatch(self, output: Any) -> Any:
        return output

    def encode_response(
        self, output: Any, context: Any = None, **kwargs: Any
    ) -> Iterator[list[dict[str, str]]]:
        for outputs in output:
            yield [{"role": "assistant", "content": output} for output in outputs]
        for request_context in context:
            assert request_context["temperature"] == 1.0, f"context {request_context} lost its temperature"


class OpenAIWithUsage(LitAPI):
    """One message that carries its token counts."""

    def setup(self, device: str) -> None:
        self.model = None

    def predict(self, x: Any, **kwargs: Any) -> Iterator[Any]:
        yield {"role": "assistant", "content": _SUM, **_USAGE}


class OpenAIWithUsageEncodeResponse(LitAPI):
    """Streams tokens; ``encode_response`` adds a last, empty message with the token counts."""

    def setup(self, device: str) -> None:
        self.model = None

    def predict(self, x: Any, **kwargs: Any) -> Iterator[str]:
        yield from ["10", " +", " ", "6", " is", " equal", " to", " ", "16", "."]

    def encode_response(self, output: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for token in output:
            yield {"role": "assistant", "content": token}
        yield {"role": "assistant", "content": "", **_USAGE}


class OpenAIBatchingWithUsage(OpenAIWithUsage):
    """Batched: one step with the answer for every request, then one usage message per request."""

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: Any, **kwargs: Any) -> Iterator[list[str]]:
        yield [_SUM] * len(x)

    def encode_response(
        self, output: Any, context: Any = None, **kwargs: Any
    ) -> Iterator[list[dict[str, Any]]]:
        for outputs in output:
            yield [{"role": "assistant", "content": output} for output in outputs]
        yield [{"role": "assistant", "content": "", **_USAGE} for _ in context]

    def unbatch(self, output: Any) -> Any:
        return output
