"""Ready-made APIs for ``OpenAIEmbeddingSpec``, with the names and behaviours of LitServe's test examples:
random 768-dimensional embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from servekit.api import LitAPI

DIMENSIONS = 768


class TestEmbedAPI(LitAPI):
    __test__ = False  # not a pytest test class

    def setup(self, device: str) -> None:
        self.model = None

    def predict(self, x: Any, **kwargs: Any) -> Any:
        count = len(x) if isinstance(x, list) else 1
        return np.random.rand(count, DIMENSIONS).tolist()

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return {"embeddings": output}


class TestEmbedBatchedAPI(TestEmbedAPI):
    def predict(self, x: Any, **kwargs: Any) -> list[list[list[float]]]:
        return [np.random.rand(len(item), DIMENSIONS).tolist() for item in x]


class TestEmbedAPIWithUsage(TestEmbedAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> dict[str, Any]:
        return {"embeddings": output, "prompt_tokens": 10, "total_tokens": 10}


class TestEmbedAPIWithYieldPredict(TestEmbedAPI):
    def predict(self, x: Any, **kwargs: Any) -> Iterator[float]:
        yield from np.random.rand(DIMENSIONS).tolist()


class TestEmbedAPIWithYieldEncodeResponse(TestEmbedAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"embeddings": output}


class TestEmbedAPIWithNonDictOutput(TestEmbedAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output


class TestEmbedAPIWithMissingEmbeddings(TestEmbedAPI):
    def encode_response(self, output: Any, **kwargs: Any) -> dict[str, Any]:
        return {"output": output}
