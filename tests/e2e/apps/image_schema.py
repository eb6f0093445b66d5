"""LitServe's image-schema example: base64 image in, the image doubled, a base64 PNG out."""

import os

import numpy as np
from PIL import Image

import servekit as ls
from servekit.schema.image import ImageInput, ImageOutput


class ImageAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = lambda x: np.array(x) * 2

    def decode_request(self, request: ImageInput) -> Image.Image:
        return request.get_image()

    def predict(self, x: Image.Image) -> np.ndarray:
        return self.model(x)

    def encode_response(self, numpy_image: np.ndarray) -> ImageOutput:
        return ImageOutput(image=Image.fromarray(np.uint8(numpy_image)).convert("RGB"))


if __name__ == "__main__":
    server = ls.LitServer(ImageAPI(), accelerator="cpu")
    server.run(host="127.0.0.1", port=int(os.environ["PORT"]), generate_client_file=False)
