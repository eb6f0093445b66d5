# An image API behind OpenAIImageSpec: a procedural "model" drawing a pattern from a hash of the prompt.
import os
import zlib

import numpy as np
from PIL import Image

import servekit as ls


def draw(prompt, index, width, height):
    """Gradient + stripes whose colours and frequency come from the prompt: what the test recomputes."""
    seed = zlib.crc32(f"{prompt}/{index}".encode())
    rng = np.random.default_rng(seed)
    colour_a, colour_b = rng.integers(0, 256, size=(2, 3))
    period = int(rng.integers(2, 9))
    x = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :, None]
    y = (np.arange(height)[:, None, None] // period) % 2
    image = colour_a * (1 - x) + colour_b * x
    image = np.where(y == 1, 255 - image, image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class PatternAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, request):
        # Users read the request as attributes or as a mapping: both are served.
        prompt, n = request["prompt"], request["n"]
        assert prompt == request.prompt and n == request.n and request.get("width") == request.width
        if prompt == "fail":
            raise RuntimeError("no pattern for 'fail'")
        images = [draw(prompt, i, request.width, request["height"]) for i in range(n)]
        # Mixed outputs: numpy arrays, and a PIL image for the first one.
        images[0] = Image.fromarray(images[0])
        return images if n > 1 else images[0]


if __name__ == "__main__":
    api = PatternAPI(spec=ls.OpenAIImageSpec(model_name="pattern", default_size="32x24"))
    server = ls.LitServer(api, accelerator="cpu", timeout=30)
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
