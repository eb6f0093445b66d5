# Embedding APIs behind OpenAIEmbeddingSpec: a deterministic toy model, optionally batched.
import os
import zlib

import numpy as np

import servekit as ls

DIM = 16


def toy_vector(item):
    """A unit vector derived from the text (or the token ids): what the test recomputes."""
    key = item if isinstance(item, str) else " ".join(map(str, item))
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    vector = rng.standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


class ToyEmbeddingAPI(ls.LitAPI):
    def setup(self, device):
        self.batch_log = os.environ.get("BATCH_LOG")

    def predict(self, inputs):
        if any(text == "fail" for text in inputs):
            raise ValueError("cannot embed 'fail'")
        if self.batch_log:
            with open(self.batch_log, "a") as f:
                f.write(f"{len(inputs)}\n")
        vectors = np.stack([toy_vector(x) for x in inputs])
        tokens = [len(x.split()) if isinstance(x, str) else len(x) for x in inputs]
        return {"embeddings": vectors, "prompt_tokens": tokens}


class ListEmbeddingAPI(ls.LitAPI):
    """predict returns plain lists (as LitServe's examples do), without token counts."""

    def setup(self, device):
        pass

    def predict(self, inputs):
        return [toy_vector(x).tolist() for x in inputs]


class LitServeEncodeAPI(ListEmbeddingAPI):
    """encode_response as LitServe's examples write it: it wraps the vectors of its request."""

    def encode_response(self, output):
        return {"embeddings": output}


if __name__ == "__main__":
    batch = int(os.environ.get("BATCH", "1"))
    api_class = {"list": ListEmbeddingAPI, "litserve": LitServeEncodeAPI}.get(
        os.environ.get("EMBED_API", ""), ToyEmbeddingAPI
    )
    api = api_class(
        max_batch_size=batch,
        batch_timeout=float(os.environ.get("BATCH_TIMEOUT", "0")),
        spec=ls.OpenAIEmbeddingSpec(
            model_name="toy-embed", supports_dimensions=os.environ.get("DIMENSIONS", "1") == "1"
        ),
    )
    server = ls.LitServer(api, accelerator="cpu", timeout=30)
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
