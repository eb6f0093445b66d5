"""OpenAIImageSpec: serve a LitAPI as OpenAI's image generation API (``POST /v1/images/generations``).

``predict`` receives the ``ImageGenerationRequest`` (``prompt``, ``n``, ``width``/``height`` from
``size``, and every other field) and returns one image, or a list of ``n`` images: PIL images,
numpy arrays or torch tensors (HxW, HxWxC or CxHxW; uint8, or floats in [0, 1]). The workers encode
them as PNG; the client gets ``b64_json`` or, for ``response_format="url"``, a
``data:image/png;base64,...`` URL. Only PNG output is supported (``output_format`` other than
``png`` is a 400).
"""

from __future__ import annotations

import base64
import inspect
import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from servekit.openai.errors import OpenAIError
from servekit.openai.images import (
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    parse_size,
)
from servekit.specs.base import documented
from servekit.specs.openai_base import OpenAIBaseSpec, read_json_body

if TYPE_CHECKING:
    from servekit.api import LitAPI


def to_pil(image: Any) -> Any:
    """A PIL image out of a PIL image, a numpy array or a torch tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # a torch tensor, without importing torch
        image = image.detach().to("cpu").numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CxHxW -> HxWxC
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"cannot make an image out of an array of shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIImageSpec(OpenAIBaseSpec):
    """OpenAI image generation: ``prompt``, ``n``, ``size``, ``response_format`` (``b64_json`` / data URL)."""

    default_api_path = "/v1/images/generations"
    stream = False

    def __init__(self, model_name: str | None = None, default_size: str = "1024x1024") -> None:
        super().__init__()
        parse_size(default_size)
        self.model_name = model_name
        self.default_size = default_size

    def pre_setup(self, lit_api: LitAPI) -> None:
        super().pre_setup(lit_api)
        if self.model_name is None:
            self.model_name = type(lit_api).__name__
        if inspect.isgeneratorfunction(type(lit_api).predict):
            raise ValueError(f"{type(lit_api).__name__}.predict must return images, not yield them")

    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        return [(self.api_path or self.default_api_path, self.generate_images, ["POST"])]

    # ----------------------------------------------------------- workers
    def populate_context(self, context: dict[str, Any], request: Any) -> None:
        if isinstance(request, ImageGenerationRequest):
            context.update(request.model_dump())

    def encode_response(self, output: Any, context_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        images = output if isinstance(output, list | tuple) else [output]
        return {"images": [png_base64(image) for image in images]}

    # ------------------------------------------------------------- front
    @documented(ImageGenerationRequest)
    async def generate_images(self, request: Request) -> Response:
        try:
            image_request = await read_json_body(request, ImageGenerationRequest)
            size = self.default_size if image_request.size in (None, "auto") else image_request.size
            assert size is not None
            image_request.width, image_request.height = parse_size(size)
            result = orjson.loads(await self.call_worker(image_request, request))
            images = result.get("images") if isinstance(result, dict) else None
            if not isinstance(images, list):
                raise OpenAIError(500, "encode_response must return {'images': [base64 PNG, ...]}")
            if len(images) != image_request.n:
                raise OpenAIError(500, f"predict returned {len(images)} images for n={image_request.n}")
            if image_request.response_format == "b64_json":
                data = [{"b64_json": image} for image in images]
            else:
                data = [{"url": f"data:image/png;base64,{image}"} for image in images]
            body = {"created": int(time.time()), "data": data, "output_format": "png", "size": size}
            return Response(orjson.dumps(body), media_type="application/json")
        except OpenAIError as error:
            return error.response()


__all__ = [
    "ImageData",
    "ImageGenerationRequest",
    "ImageGenerationResponse",
    "OpenAIImageSpec",
    "png_base64",
    "to_pil",
]
