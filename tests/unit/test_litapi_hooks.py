"""LitAPI's own methods, called directly as LitServe's users and tests call them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

import servekit as ls


class EchoAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, x: Any) -> Any:
        return x


class StreamingEchoAPI(ls.LitAPI):
    def predict(self, x: Any) -> Any:
        yield x

    def encode_response(self, outputs: Any) -> Any:
        yield from outputs


class Answer(BaseModel):
    output: float


def test_format_encoded_response_writes_json_lines_and_passes_text_through() -> None:
    api = EchoAPI()
    assert api.format_encoded_response({"output": 4.0}) == '{"output": 4.0}\n'
    assert json.loads(api.format_encoded_response({"x": np.float32(1.5), "v": np.arange(2)})) == {
        "x": 1.5,
        "v": [0, 1],
    }
    assert api.format_encoded_response(Answer(output=2.0)) == '{"output":2.0}\n'
    assert api.format_encoded_response("already framed") == "already framed"
    assert api.format_encoded_response([1, 2]) == [1, 2]


def test_pre_setup_attaches_the_spec_and_validates() -> None:
    api = EchoAPI()
    spec = ls.OpenAISpec()
    api.pre_setup(spec=spec)
    assert api.spec is spec and api.stream  # the OpenAI spec streams
    with pytest.raises(ValueError, match="generator"):
        EchoAPI(stream=True).pre_setup()
    StreamingEchoAPI(stream=True).pre_setup()  # a generator predict and encode_response: fine
