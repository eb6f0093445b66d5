"""ls.schema.image over HTTP: a base64 PNG in, the hooks see a PIL image, a base64 PNG out."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(120)


def test_image_in_image_out(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 20, 30)).save(buffer, format="PNG")
    with serve_script("image_schema.py", tmp_path) as server:
        reply = httpx.post(
            f"{server.url}/predict", json={"image_data": base64.b64encode(buffer.getvalue()).decode()}
        )
        invalid = httpx.post(f"{server.url}/predict", json={"image_data": "abc"})
    assert reply.status_code == 200, reply.text
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["image"])))
    assert image.size == (32, 16)
    assert image.getpixel((0, 0)) == (20, 40, 60)
    assert invalid.status_code == 422
    assert "Invalid Base64 string" in invalid.text
