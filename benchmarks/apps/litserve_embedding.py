"""all-MiniLM-L6-v2 behind LitServe's own OpenAIEmbeddingSpec: the comparison in bench_embeddings.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import litserve

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.embedding_server import MiniLMEncoder


class LitServeMiniLM(litserve.LitAPI):
    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
        self.encoder = MiniLMEncoder("cpu")

    def predict(self, inputs: list[Any]) -> Any:
        # LitServe hands over each request's `input` as sent: one string per request here.
        texts = [x if isinstance(x, str) else x[0] for x in inputs]
        return self.encoder.encode(texts)["embeddings"]


if __name__ == "__main__":
    api = LitServeMiniLM(
        max_batch_size=int(os.environ.get("MAX_BATCH_SIZE", "32")),
        batch_timeout=float(os.environ.get("BATCH_TIMEOUT", "0.01")),
    )
    server = litserve.LitServer(api, spec=litserve.OpenAIEmbeddingSpec(), accelerator="cpu", timeout=60)
    server.run(port=int(os.environ["PORT"]), host="127.0.0.1", generate_client_file=False)
