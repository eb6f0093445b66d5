"""OpenAIEmbeddingSpec through a real server and the official ``openai`` client."""

from __future__ import annotations

import base64
import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.apps.openai_embedding import DIM, toy_vector
from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(120)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


def test_inputs_encodings_usage_and_dimensions(tmp_path: Path) -> None:
    with serve_script("openai_embedding.py", tmp_path) as server:
        client = client_for(server.url)
        texts = ["hello world", "a longer sentence with six words", "x"]

        # The openai client asks for base64 by default and decodes it to floats itself.
        default = client.embeddings.create(model="toy-embed", input=texts)
        assert default.model == "toy-embed"
        assert [d.index for d in default.data] == [0, 1, 2]
        for item, text in zip(default.data, texts, strict=True):
            assert np.array_equal(np.asarray(item.embedding, dtype=np.float32), toy_vector(text))
        assert default.usage.prompt_tokens == 2 + 6 + 1
        assert default.usage.total_tokens == 9

        floats = client.embeddings.create(model="toy-embed", input=texts, encoding_format="float")
        for a, b in zip(floats.data, default.data, strict=True):
            assert np.array_equal(
                np.asarray(a.embedding, dtype=np.float32), np.asarray(b.embedding, dtype=np.float32)
            )

        single = client.embeddings.create(model="toy-embed", input="just one", encoding_format="float")
        assert len(single.data) == 1 and len(single.data[0].embedding) == DIM
        np.testing.assert_allclose(single.data[0].embedding, toy_vector("just one"), atol=1e-7)

        tokens = client.embeddings.create(model="toy-embed", input=[5, 6, 7])
        assert len(tokens.data) == 1 and tokens.usage.prompt_tokens == 3
        np.testing.assert_allclose(tokens.data[0].embedding, toy_vector([5, 6, 7]), atol=1e-7)
        many_tokens = client.embeddings.create(model="toy-embed", input=[[1, 2], [3, 4, 5]])
        assert len(many_tokens.data) == 2 and many_tokens.usage.prompt_tokens == 5

        raw = httpx.post(
            f"{server.url}/v1/embeddings",
            json={"model": "m", "input": ["hello world"], "encoding_format": "base64"},
            timeout=10,
        ).json()
        assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, toy_vector("hello world"))

        # dimensions: truncated to the size asked for, and renormalised.
        short = client.embeddings.create(
            model="toy-embed", input=texts, dimensions=4, encoding_format="float"
        )
        short_b64 = client.embeddings.create(model="toy-embed", input=texts, dimensions=4)
        for item, item_b64, text in zip(short.data, short_b64.data, texts, strict=True):
            expected = toy_vector(text)[:4] / np.linalg.norm(toy_vector(text)[:4])
            np.testing.assert_allclose(item.embedding, expected, atol=1e-6)
            np.testing.assert_allclose(item_b64.embedding, expected, atol=1e-6)

        with pytest.raises(openai.BadRequestError) as too_big:
            client.embeddings.create(model="toy-embed", input="x", dimensions=DIM + 1)
        assert too_big.value.body["param"] == "dimensions"  # type: ignore[index]


def test_invalid_requests_and_failures(tmp_path: Path) -> None:
    with serve_script("openai_embedding.py", tmp_path) as server:
        url = f"{server.url}/v1/embeddings"
        for body, param in [
            ({"model": "m"}, "input"),
            ({"model": "m", "input": []}, "input"),
            ({"model": "m", "input": ""}, "input"),
            ({"model": "m", "input": [1, "a"]}, "input"),
            ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
            ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ]:
            response = httpx.post(url, json=body, timeout=10)
            assert response.status_code == 400, body
            assert response.json()["error"]["param"] == param, response.json()
        failed = httpx.post(url, json={"model": "m", "input": ["ok", "fail"]}, timeout=10)
        assert failed.status_code == 500
        assert failed.json()["error"]["message"] == "Internal server error"
        assert httpx.post(url, json={"model": "m", "input": "ok"}, timeout=10).status_code == 200


def _embed_concurrently(client: openai.OpenAI, requests: list[list[str]]) -> list[list[np.ndarray]]:
    """Each request sent at once from its own thread, as concurrent clients do."""

    def embed(inputs: list[str]) -> list[np.ndarray]:
        reply = client.embeddings.create(model="toy-embed", input=inputs)
        return [np.asarray(d.embedding, dtype=np.float32) for d in reply.data]

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(embed, requests))


def test_dynamic_batching_puts_many_requests_in_one_predict(tmp_path: Path) -> None:
    log = tmp_path / "batches.log"
    env = {"BATCH": "8", "BATCH_TIMEOUT": "5", "BATCH_LOG": str(log)}
    with serve_script("openai_embedding.py", tmp_path, env=env) as server:
        client = client_for(server.url)
        requests = [[f"sentence {i} part {j}" for j in range(i % 3 + 1)] for i in range(8)]

        replies = _embed_concurrently(client, requests)
        for inputs, vectors in zip(requests, replies, strict=True):
            assert len(vectors) == len(inputs)
            for text, vector in zip(inputs, vectors, strict=True):
                assert np.array_equal(vector, toy_vector(text))
        # The window closes at 8 requests: one predict call got every request's inputs.
        assert log.read_text().split() == [str(sum(len(r) for r in requests))]


def test_predict_returning_plain_lists_without_usage(tmp_path: Path) -> None:
    with serve_script(
        "openai_embedding.py", tmp_path, env={"EMBED_API": "list", "DIMENSIONS": "0"}
    ) as server:
        client = client_for(server.url)
        reply = client.embeddings.create(model="toy-embed", input=["a", "b"], encoding_format="float")
        np.testing.assert_allclose(reply.data[1].embedding, toy_vector("b"), atol=1e-7)
        assert reply.usage.prompt_tokens == 0
        with pytest.raises(openai.BadRequestError, match="does not support 'dimensions'"):
            client.embeddings.create(model="toy-embed", input="a", dimensions=4)


def test_batched_requests_reach_a_litserve_style_encode_response(tmp_path: Path) -> None:
    env = {"EMBED_API": "litserve", "BATCH": "4", "BATCH_TIMEOUT": "2"}
    with serve_script("openai_embedding.py", tmp_path, env=env) as server:
        client = client_for(server.url)
        requests = [["one"], ["two", "three"], ["four"], ["five", "six", "seven"]]

        replies = _embed_concurrently(client, requests)
        for inputs, vectors in zip(requests, replies, strict=True):
            assert [v.tolist() for v in vectors] == [toy_vector(text).tolist() for text in inputs]
