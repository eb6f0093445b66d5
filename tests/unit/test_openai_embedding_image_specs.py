"""OpenAIEmbeddingSpec and OpenAIImageSpec pieces without a server."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import servekit as ls
from servekit.openai.errors import OpenAIError
from servekit.specs.openai_embedding import EmbeddingRequest, OpenAIEmbeddingSpec, as_float32_matrix
from servekit.specs.openai_image import ImageGenerationRequest, OpenAIImageSpec, png_base64, to_pil

torch.set_num_threads(1)


def test_exports() -> None:
    assert ls.OpenAIEmbeddingSpec is OpenAIEmbeddingSpec is ls.specs.OpenAIEmbeddingSpec
    assert ls.OpenAIImageSpec is OpenAIImageSpec is ls.specs.OpenAIImageSpec


@pytest.mark.parametrize(
    ("value", "inputs"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_embedding_inputs(value: Any, inputs: list[Any]) -> None:
    request = EmbeddingRequest(input=value, model="m")
    assert request.inputs() == inputs
    assert OpenAIEmbeddingSpec().decode_request(request) == inputs


@pytest.mark.parametrize("value", ["", [], [""], [[]], [1, "a"]])
def test_embedding_invalid_inputs(value: Any) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest(input=value, model="m")


def test_batch_flattens_and_unbatch_splits_vectors_and_token_counts() -> None:
    spec = OpenAIEmbeddingSpec()
    flat = spec.batch([["a", "b"], ["c"], ["d", "e", "f"]])
    assert flat == ["a", "b", "c", "d", "e", "f"]
    vectors = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    outputs = spec.unbatch({"embeddings": vectors, "prompt_tokens": [1, 2, 3, 4, 5, 6]})
    assert [o["prompt_tokens"] for o in outputs] == [3, 3, 15]
    assert [len(o["embeddings"]) for o in outputs] == [2, 1, 3]
    np.testing.assert_array_equal(outputs[1]["embeddings"], [[4.0, 5.0]])
    # Without per-input token counts each request gets its vectors alone, as a LitServe
    # encode_response (``{"embeddings": output}``) expects them.
    spec.batch(["a", ["b", "c"]])
    plain = spec.unbatch(vectors[:3].tolist())
    np.testing.assert_array_equal(plain[0], [[0.0, 1.0]])
    np.testing.assert_array_equal(plain[1], [[2.0, 3.0], [4.0, 5.0]])
    spec.batch([["a"], ["b"]])
    with pytest.raises(ValueError, match="3 vectors for a batch of 2"):
        spec.unbatch(np.zeros((3, 2)))


def test_encode_response_sends_exact_float32_base64() -> None:
    spec = OpenAIEmbeddingSpec()
    vectors = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    encoded = spec.encode_response({"embeddings": vectors, "prompt_tokens": 7})
    assert encoded["prompt_tokens"] == 7
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in encoded["embeddings_base64"]]
    )
    assert np.array_equal(decoded, vectors)
    assert spec.encode_response(vectors[0].tolist())["prompt_tokens"] == 0


def test_float32_matrix_from_every_kind_of_vectors() -> None:
    assert as_float32_matrix([0.5, 1.0]).shape == (1, 2)
    assert as_float32_matrix(torch.ones(3, 4, dtype=torch.float64)).dtype == np.float32
    with pytest.raises(ValueError, match="2-D"):
        as_float32_matrix(np.zeros((2, 2, 2)))


def response_of(
    spec: OpenAIEmbeddingSpec, request: EmbeddingRequest, result: dict[str, Any]
) -> dict[str, Any]:
    return dict(orjson.loads(spec._response_body(request, result)))


def test_response_formats_and_dimensions() -> None:
    spec = OpenAIEmbeddingSpec(model_name="emb")
    vectors = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    worker_reply = orjson.loads(orjson.dumps(spec.encode_response(vectors)))

    floats = response_of(spec, EmbeddingRequest(input=["a", "b"]), worker_reply)
    assert floats["model"] == "emb" and floats["object"] == "list"
    assert floats["data"][0] == {"object": "embedding", "index": 0, "embedding": [3.0, 4.0, 12.0]}

    b64 = response_of(spec, EmbeddingRequest(input=["a", "b"], encoding_format="base64"), worker_reply)
    assert b64["data"][1]["embedding"] == worker_reply["embeddings_base64"][1]

    short = response_of(spec, EmbeddingRequest(input=["a", "b"], dimensions=2), worker_reply)
    np.testing.assert_allclose(short["data"][0]["embedding"], [0.6, 0.8], rtol=1e-6)

    with pytest.raises(OpenAIError) as too_big:
        response_of(spec, EmbeddingRequest(input=["a", "b"], dimensions=4), worker_reply)
    assert too_big.value.status_code == 400 and too_big.value.param == "dimensions"
    with pytest.raises(OpenAIError) as unsupported:
        response_of(
            OpenAIEmbeddingSpec(supports_dimensions=False),
            EmbeddingRequest(input=["a", "b"], dimensions=2),
            worker_reply,
        )
    assert unsupported.value.status_code == 400
    with pytest.raises(OpenAIError, match="2 embeddings for 3 inputs"):
        response_of(spec, EmbeddingRequest(input=["a", "b", "c"]), worker_reply)

    # LitServe's shape, from a custom encode_response: {"embeddings": [[...]], "prompt_tokens": n}.
    litserve_style = response_of(
        spec, EmbeddingRequest(input="a"), {"embeddings": [[1.0, 2.0]], "prompt_tokens": 2}
    )
    assert (
        litserve_style["data"][0]["embedding"] == [1.0, 2.0] and litserve_style["usage"]["prompt_tokens"] == 2
    )
    tokens = response_of(spec, EmbeddingRequest(input=[[1, 2], [3]]), {"embeddings": [[1.0], [2.0]]})
    assert tokens["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embedding_pre_setup_rejects_a_streaming_predict() -> None:
    class Streams(ls.LitAPI):
        def predict(self, inputs: Any) -> Any:
            yield [0.0]

    spec = OpenAIEmbeddingSpec()
    api = Streams(spec=spec)
    with pytest.raises(ValueError, match="not streamed"):
        spec.pre_setup(api)


def test_to_pil_accepts_arrays_tensors_and_images() -> None:
    hwc = np.zeros((4, 6, 3), dtype=np.uint8)
    assert to_pil(hwc).size == (6, 4)
    chw = torch.ones(3, 4, 6)  # floats in [0, 1], channels first
    image = to_pil(chw)
    assert image.size == (6, 4) and np.asarray(image)[0, 0].tolist() == [255, 255, 255]
    assert to_pil(np.zeros((4, 6), dtype=np.float32)).mode == "L"
    pil = Image.new("RGB", (2, 2))
    assert to_pil(pil) is pil
    with pytest.raises(ValueError, match="shape"):
        to_pil(np.zeros((2, 6, 5)))
    decoded = Image.open(io.BytesIO(base64.b64decode(png_base64(hwc))))
    assert decoded.format == "PNG" and decoded.size == (6, 4)


def test_image_request_validation_and_encoding() -> None:
    assert ImageGenerationRequest(prompt="x", size="64x32").size == "64x32"
    for bad in ({"prompt": "x", "size": "64"}, {"prompt": "x", "size": "0x10"}, {"prompt": "x", "n": 11}):
        with pytest.raises(ValidationError):
            ImageGenerationRequest.model_validate(bad)
    spec = OpenAIImageSpec()
    encoded = spec.encode_response([np.zeros((2, 2, 3), dtype=np.uint8)] * 2)
    assert len(encoded["images"]) == 2
    assert len(spec.encode_response(np.zeros((2, 2, 3), dtype=np.uint8))["images"]) == 1


def test_image_request_reads_as_attributes_and_as_a_mapping() -> None:
    request = ImageGenerationRequest.model_validate({"prompt": "a fox", "n": 2, "size": "64x32", "seed": 7})
    request.width, request.height = 64, 32
    assert request["prompt"] == request.prompt == "a fox"
    assert (request["n"], request["size"], request["width"], request["height"]) == (2, "64x32", 64, 32)
    assert request["seed"] == 7 and "seed" in request and request.get("seed") == 7  # an extra field
    assert "style" in request and request["style"] is None
    assert "nope" not in request and request.get("nope", "default") == "default"
    with pytest.raises(KeyError):
        request["nope"]
    assert set(request.keys()) >= {"prompt", "n", "size", "width", "height", "seed"}
    assert {**request}["seed"] == 7 and dict(request)["prompt"] == "a fox"  # unpacks as a mapping
