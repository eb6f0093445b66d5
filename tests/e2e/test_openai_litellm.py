"""The OpenAI specs through LiteLLM's OpenAI provider (``model="openai/<name>"``, ``api_base=...``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.apps.openai_embedding import toy_vector
from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch of the cost map
    import litellm

    return litellm


def test_litellm_completion_streaming_and_not(tmp_path: Path, litellm: Any) -> None:
    with serve_script("openai_chat.py", tmp_path, env={"CHAT_API": "echo"}) as server:
        options = {"model": "openai/my-model", "api_base": f"{server.url}/v1", "api_key": "none"}
        reply = litellm.completion(messages=[{"role": "user", "content": "capital"}], **options)
        assert reply.choices[0].message.content == "Canberra"
        assert reply.choices[0].finish_reason == "stop"

        words = litellm.completion(messages=[{"role": "user", "content": "words"}], **options)
        assert words.choices[0].message.content == "one two three"
        assert words.usage.prompt_tokens == 7 and words.usage.completion_tokens == 3

        stream = litellm.completion(messages=[{"role": "user", "content": "words"}], stream=True, **options)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
        assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_litellm_embedding(tmp_path: Path, litellm: Any) -> None:
    with serve_script("openai_embedding.py", tmp_path) as server:
        reply = litellm.embedding(
            model="openai/toy-embed", api_base=f"{server.url}/v1", api_key="none", input=["hello world", "x"]
        )
        assert len(reply.data) == 2
        for item, text in zip(reply.data, ["hello world", "x"], strict=True):
            np.testing.assert_allclose(item["embedding"], toy_vector(text), atol=1e-6)
        assert reply.usage.prompt_tokens == 3
