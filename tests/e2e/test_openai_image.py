"""OpenAIImageSpec through a real server and the official ``openai`` client."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.apps.openai_image import draw
from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(120)


def decode_png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_generate_images_with_the_openai_client(tmp_path: Path) -> None:
    with serve_script("openai_image.py", tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)

        result = client.images.generate(prompt="a red fox", n=3, size="40x16", response_format="b64_json")
        assert len(result.data) == 3
        for index, item in enumerate(result.data):
            assert item.b64_json is not None
            assert np.array_equal(decode_png(item.b64_json), draw("a red fox", index, 40, 16))

        as_url = client.images.generate(prompt="a red fox", size="40x16", response_format="url")
        url = as_url.data[0].url
        assert url is not None and url.startswith("data:image/png;base64,")
        assert np.array_equal(decode_png(url.split(",", 1)[1]), draw("a red fox", 0, 40, 16))

        default_size = client.images.generate(prompt="auto", response_format="b64_json")
        assert default_size.data[0].b64_json is not None
        assert decode_png(default_size.data[0].b64_json).shape == (24, 32, 3)

        for body, param in [
            ({"prompt": "x", "size": "big"}, "size"),
            ({"prompt": "x", "n": 0}, "n"),
            ({"prompt": ""}, "prompt"),
            ({"n": 1}, "prompt"),
            ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ]:
            response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=10)
            assert response.status_code == 400, body
            assert response.json()["error"]["param"] == param
        with pytest.raises(openai.InternalServerError, match="Internal server error"):
            client.images.generate(prompt="fail")
