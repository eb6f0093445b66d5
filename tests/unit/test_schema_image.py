"""ls.schema.image: base64 images in requests, PIL images out, as LitServe's types behave."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

import servekit as ls
from servekit.schema.image import ImageInput, ImageOutput


def _png_base64(size: tuple[int, int] = (8, 4), color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_input_decodes_base64_to_a_pil_image() -> None:
    request = ls.schema.image.ImageInput(image_data=_png_base64())
    image = request.get_image()
    assert isinstance(image, Image.Image)
    assert image.size == (8, 4)
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_image_input_rejects_what_is_not_an_image() -> None:
    with pytest.raises(ValidationError, match="Invalid Base64 string"):
        ImageInput(image_data="abc")  # bad padding
    with pytest.raises(ValueError, match="Missing image data for key 'image_data'"):
        ImageInput().get_image()
    with pytest.raises(ValueError, match="Error loading image from decoded data"):
        ImageInput(image_data=base64.b64encode(b"not an image").decode()).get_image()


class ThreeImages(ImageInput):
    image_0: str
    image_1: str
    image_2: str


def test_subclasses_hold_several_images_checked_alike() -> None:
    request = ThreeImages(
        image_0=_png_base64((1, 1)), image_1=_png_base64((2, 2)), image_2=_png_base64((3, 3))
    )
    assert [request.get_image(f"image_{i}").size for i in range(3)] == [(1, 1), (2, 2), (3, 3)]
    with pytest.raises(ValidationError, match="Invalid Base64 string in 'image_1'"):
        ThreeImages(image_0=_png_base64(), image_1="abc", image_2=_png_base64())


def test_image_output_serialises_a_pil_image_as_base64_png() -> None:
    body = ImageOutput(image=Image.new("RGB", (5, 6), "blue")).model_dump(mode="json")
    data = base64.b64decode(body["image"])
    assert data.startswith(b"\x89PNG")
    image = Image.open(io.BytesIO(data))
    assert image.size == (5, 6)
    assert image.getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(PydanticSerializationError, match="Expected a PIL Image"):
        ImageOutput(image="not an image").model_dump_json()


def test_ls_schema_image_is_reachable_from_the_package_alone() -> None:
    import subprocess
    import sys

    code = "import sys, servekit as ls; ls.schema.image.ImageInput; assert 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
