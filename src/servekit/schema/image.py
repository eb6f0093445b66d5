"""Images in requests and responses: base64 text on the wire, PIL images in the hooks.

``decode_request(self, request: ImageInput)`` receives validated base64 (every string field is
checked, so subclasses may add ``image_0``, ``image_1``, ...); ``request.get_image()`` decodes one
to a PIL image. ``encode_response`` may return ``ImageOutput(image=pil_image)``: the client gets
``{"image": "<base64 PNG>"}``. Pillow is needed only when an image is decoded or encoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, field_serializer, model_validator

if TYPE_CHECKING:
    from PIL import Image


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Pillow is needed for images: pip install 'servekit[image]' (or pillow)") from None
    return Image


class ImageInput(BaseModel):
    image_data: str | None = None

    @model_validator(mode="after")
    def _check_base64(self) -> ImageInput:
        for name, value in self:
            if isinstance(value, str) and value:
                try:
                    base64.b64decode(value)
                except binascii.Error:
                    raise ValueError(f"Invalid Base64 string in {name!r}.") from None
        return self

    def get_image(self, key: str | None = None) -> Image.Image:
        """The image in field ``key`` (default ``image_data``), decoded."""
        key = key or "image_data"
        data = getattr(self, key, None)
        if not data:
            raise ValueError(f"Missing image data for key '{key}'")
        image_module = _pillow()
        from PIL import UnidentifiedImageError

        try:
            return image_module.open(io.BytesIO(base64.b64decode(data)))
        except UnidentifiedImageError as error:
            raise ValueError(f"Error loading image from decoded data: {error}") from None


class ImageOutput(BaseModel):
    image: Any

    @field_serializer("image")
    def _image_as_base64_png(self, image: Any) -> str:
        image_module = _pillow()
        if not isinstance(image, image_module.Image):
            raise TypeError(f"Expected a PIL Image, got {type(image)}")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
