"""The loaded model's bounds written into /openapi.json (servekit.specs.llm.schemas), and bodies
parsed as JSON Schema reads them (1.0 is an integer)."""

from __future__ import annotations

import re

import orjson
import pytest

from servekit.http.openapi import OpenAPIDoc
from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.completions import CompletionRequest
from servekit.openai.errors import OpenAIError, parse_body
from servekit.proxy.openapi import nodes_document
from servekit.specs.llm.protocol import DetokenizeRequest, GenerateRequest
from servekit.specs.llm.schemas import below, bound_document

INFO = {"vocab_size": 600, "chat_roles": ["system", "user"], "is_generation": True}


@pytest.mark.parametrize("bound", [1, 2, 9, 10, 11, 100, 101, 600, 49152, 151936])
def test_below_matches_exactly_the_numbers_under_the_bound(bound: int) -> None:
    pattern = re.compile(f"^0*(?:{below(bound)})$")
    assert [n for n in range(min(bound + 300, 160_000)) if pattern.match(str(n))] == list(range(bound))
    assert not pattern.match("") and not pattern.match("-1") and not pattern.match("1.0")


def document() -> dict[str, object]:
    doc = OpenAPIDoc()
    for path, body in (
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
        ("/generate", GenerateRequest),
        ("/detokenize", DetokenizeRequest),
        ("/v1/embeddings", None),
    ):
        doc.add(path, ["POST"], body=body)
    return doc.document("t", "0")


def test_bound_document_writes_the_model_into_a_copy() -> None:
    original = document()
    before = orjson.dumps(original)
    bounded = bound_document(original, INFO)
    assert orjson.dumps(original) == before  # the generated document is left as it was
    schemas = bounded["components"]["schemas"]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == 599
    assert "x-token-id" not in orjson.dumps(schemas).decode()
    names = schemas["ChatCompletionRequest"]["properties"]["logit_bias"]["anyOf"][0]["propertyNames"]
    assert re.match(names["pattern"], "599") and not re.match(names["pattern"], "600")
    assert schemas["ChatMessage"]["properties"]["role"] == {"type": "string", "enum": ["system", "user"]}
    assert schemas["CompletionRequest"]["properties"]["suffix"]["type"] == "null"
    max_tokens = schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["minimum"] == 1
    assert "/v1/embeddings" not in bounded["paths"] and "/v1/embeddings" in original["paths"]  # type: ignore[operator]
    assert (
        "enum"
        not in bound_document(original, {**INFO, "chat_roles": None})["components"]["schemas"]["ChatMessage"][
            "properties"
        ]["role"]
    )


def test_the_proxy_bounds_only_by_nodes_that_agree() -> None:
    original = document()
    assert nodes_document(original, [INFO, dict(INFO)]) == bound_document(original, INFO)
    assert nodes_document(original, [INFO, {**INFO, "vocab_size": 601}]) is original
    assert nodes_document(original, [INFO, None]) is original
    assert nodes_document(original, []) is original


def test_integral_floats_are_integers_and_nothing_else_is_coerced() -> None:
    body = parse_body(b'{"tokens": [1.0, 2], "model": null}', DetokenizeRequest)
    assert body.tokens == [1, 2]
    # Past 64 bits too, as the same integer written in digits is.
    assert parse_body(b'{"tokens": [1e20]}', DetokenizeRequest).tokens == [10**20]
    for bad in (b'{"tokens": [1.5]}', b'{"tokens": ["1"]}', b'{"tokens": [true]}', b'{"tokens": [1e-300]}'):
        with pytest.raises(OpenAIError) as error:
            parse_body(bad, DetokenizeRequest)
        assert error.value.status_code == 400
    with pytest.raises(OpenAIError) as error:
        parse_body(b"[1]", DetokenizeRequest)
    assert error.value.code == "invalid_json"


def test_generate_declares_and_checks_its_alternatives_and_sampling_params() -> None:
    schema = GenerateRequest.model_json_schema()
    assert [alt["required"] for alt in schema["anyOf"]] == [["text"], ["input_ids"]]
    sampling = schema["$defs"]["GenerateSamplingParams"]
    assert sampling["additionalProperties"] is False
    with pytest.raises(OpenAIError) as error:
        parse_body(b'{"text": "x", "sampling_params": {"temperature": "hot"}}', GenerateRequest)
    assert error.value.param == "sampling_params.temperature"
    with pytest.raises(OpenAIError):
        parse_body(b'{"text": "x", "sampling_params": {"unknown": 1}}', GenerateRequest)
    with pytest.raises(OpenAIError):
        parse_body(b'{"text": ""}', GenerateRequest)
    params = parse_body(b'{"text": "x", "sampling_params": {"max_new_tokens": 3}}', GenerateRequest)
    assert params.to_sampling_params().max_tokens == 3
