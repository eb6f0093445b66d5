"""OpenAIEmbeddingSpec: serve a LitAPI as OpenAI's embeddings API (``POST /v1/embeddings``).

``predict`` receives a list of inputs (strings, or token-id lists when the client sent token arrays)
and returns one vector per input: a 2-D numpy array or torch tensor, or a list of lists. It may also
return ``{"embeddings": vectors, "prompt_tokens": n}`` where ``n`` is an int, or a list with one count
per input (the form that survives dynamic batching), to fill ``usage``.

With ``max_batch_size > 1`` the inputs of many requests are flattened into ONE ``predict`` call and
the vectors are split back per request.

``dimensions``: with ``supports_dimensions=True`` (the default, for Matryoshka-style models) the
vectors are truncated to the requested size and L2-renormalised; a size above the model's is a 400.
With ``supports_dimensions=False`` any ``dimensions`` other than the model's size is a 400.
"""

from __future__ import annotations

import base64
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from servekit.openai.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    UsageInfo,
)
from servekit.openai.errors import OpenAIError
from servekit.specs.base import documented
from servekit.specs.openai_base import OpenAIBaseSpec, read_json_body

if TYPE_CHECKING:
    from servekit.api import LitAPI

logger = logging.getLogger(__name__)


def as_float32_matrix(vectors: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Vectors (numpy, torch, lists; one vector or several) as a C-contiguous little-endian float32 matrix."""
    if hasattr(vectors, "detach"):  # a torch tensor, without importing torch
        vectors = vectors.detach().to("cpu").float().numpy()
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype="<f4"))
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise ValueError(f"expected one vector per input (a 2-D array), got an array of shape {matrix.shape}")
    return matrix


def _split_output(output: Any) -> tuple[Any, Any]:
    """(vectors, prompt_tokens) out of predict's output, bare vectors or a dict."""
    if isinstance(output, dict):
        if "embeddings" not in output:
            raise ValueError("predict returned a dict without an 'embeddings' key")
        return output["embeddings"], output.get("prompt_tokens", 0)
    return output, 0


def _token_total(prompt_tokens: Any) -> int:
    if isinstance(prompt_tokens, int | np.integer):
        return int(prompt_tokens)
    if isinstance(prompt_tokens, list | tuple | np.ndarray):
        return int(sum(int(n) for n in prompt_tokens))
    return 0


class OpenAIEmbeddingSpec(OpenAIBaseSpec):
    """OpenAI embeddings: string, list and token-array inputs; float and base64 encodings; batching."""

    default_api_path = "/v1/embeddings"
    stream = False

    def __init__(self, model_name: str | None = None, supports_dimensions: bool = True) -> None:
        super().__init__()
        self.model_name = model_name
        self.supports_dimensions = supports_dimensions
        self._batch_sizes: list[int] | None = None

    # ------------------------------------------------------ main process
    def pre_setup(self, lit_api: LitAPI) -> None:
        super().pre_setup(lit_api)
        if self.model_name is None:
            self.model_name = type(lit_api).__name__
        if inspect.isgeneratorfunction(type(lit_api).predict):
            raise ValueError(
                f"You are using yield in your predict method ({type(lit_api).__name__}), but embeddings "
                "are not streamed: return one vector per input instead (e.g. a 2-D array)"
            )
        if inspect.isgeneratorfunction(type(lit_api).encode_response):
            raise ValueError(
                f"You are using yield in your encode_response method ({type(lit_api).__name__}): "
                "with OpenAIEmbeddingSpec it must return the embeddings, not yield them"
            )

    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        return [(self.api_path or self.default_api_path, self.embeddings, ["POST"])]

    # ----------------------------------------------------------- workers
    def populate_context(self, context: dict[str, Any], request: Any) -> None:
        if isinstance(request, EmbeddingRequest):
            context.update(request.model_dump(exclude={"input"}))

    def decode_request(self, request: Any, context_kwargs: dict[str, Any] | None = None) -> Any:
        if isinstance(request, EmbeddingRequest):
            return request.inputs()
        return request

    def batch(self, inputs: list[Any]) -> list[Any]:
        """Many requests' inputs as one flat list (the sizes are kept to split the vectors back)."""
        self._batch_sizes = [len(x) if isinstance(x, list) else 1 for x in inputs]
        flat: list[Any] = []
        for x in inputs:
            if isinstance(x, list):
                flat.extend(x)
            else:
                flat.append(x)
        return flat

    def unbatch(self, output: Any) -> list[Any]:
        sizes, self._batch_sizes = self._batch_sizes, None
        vectors, prompt_tokens = _split_output(output)
        matrix = as_float32_matrix(vectors)
        if sizes is None:
            sizes = [1] * len(matrix)
        if len(matrix) != sum(sizes):
            raise ValueError(f"predict returned {len(matrix)} vectors for a batch of {sum(sizes)} inputs")
        per_input_tokens = isinstance(prompt_tokens, list | tuple | np.ndarray)
        # Each request gets its rows in the shape predict gave the batch: the vectors alone, or with
        # their token counts when predict counted per input; its encode_response takes them from there.
        outputs: list[Any] = []
        start = 0
        for size in sizes:
            rows = matrix[start : start + size]
            if per_input_tokens:
                tokens = _token_total(prompt_tokens[start : start + size])
                outputs.append({"embeddings": rows, "prompt_tokens": tokens})
            else:
                outputs.append(rows)
            start += size
        return outputs

    def encode_response(self, output: Any, context_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The vectors as base64 of little-endian float32 (exact and compact) for the front."""
        vectors, prompt_tokens = _split_output(output)
        matrix = as_float32_matrix(vectors)
        return {
            "embeddings_base64": [base64.b64encode(row.tobytes()).decode("ascii") for row in matrix],
            "prompt_tokens": _token_total(prompt_tokens),
        }

    # ------------------------------------------------------------- front
    @documented(EmbeddingRequest)
    async def embeddings(self, request: Request) -> Response:
        try:
            embedding_request = await read_json_body(request, EmbeddingRequest)
            result = orjson.loads(await self.call_worker(embedding_request, request))
            return Response(self._response_body(embedding_request, result), media_type="application/json")
        except OpenAIError as error:
            return error.response()

    def _response_body(self, request: EmbeddingRequest, result: Any) -> bytes:
        if not isinstance(result, dict) or not ("embeddings_base64" in result or "embeddings" in result):
            raise OpenAIError(500, "encode_response must return a dict with the 'embeddings'")
        encoded = result.get("embeddings_base64")
        expected = request.get_num_items()
        rows: list[Any]
        if encoded is not None and request.dimensions is None and request.encoding_format == "base64":
            rows = encoded  # already what the client wants: no decoding in the front
        else:
            try:
                matrix = (
                    _decode_base64_rows(encoded)
                    if encoded is not None
                    else as_float32_matrix(result["embeddings"])
                )
            except (ValueError, TypeError) as error:
                raise OpenAIError(500, f"Malformed embeddings from the API: {error}") from None
            matrix = self._resize(matrix, request.dimensions)
            if request.encoding_format == "base64":
                rows = [base64.b64encode(row.tobytes()).decode("ascii") for row in matrix]
            else:
                rows = list(matrix)
        if len(rows) != expected:
            raise OpenAIError(500, f"predict returned {len(rows)} embeddings for {expected} inputs")
        prompt_tokens = int(result.get("prompt_tokens") or 0) or request.token_count()
        return orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                "model": request.model or self.model_name or "",
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    def _resize(
        self, matrix: np.ndarray[Any, np.dtype[np.float32]], dimensions: int | None
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        size = matrix.shape[1]
        if dimensions is None or dimensions == size:
            return matrix
        if not self.supports_dimensions:
            raise OpenAIError(
                400, f"This model does not support 'dimensions' (its vectors have {size})", param="dimensions"
            )
        if dimensions > size:
            raise OpenAIError(
                400,
                f"'dimensions' must be at most {size} for this model, got {dimensions}",
                param="dimensions",
            )
        truncated = matrix[:, :dimensions]
        norms = np.linalg.norm(truncated, axis=1, keepdims=True)
        return np.ascontiguousarray(truncated / np.where(norms > 0, norms, 1), dtype="<f4")


def _decode_base64_rows(rows: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
    if not rows:
        raise ValueError("no embeddings")
    return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows]).astype(
        np.float32, copy=False
    )


__all__ = [
    "Embedding",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "OpenAIEmbeddingSpec",
    "UsageInfo",
]
