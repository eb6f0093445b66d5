"""`servekit serve` on tiny checkpoints of non-Llama families: chat and completions via `openai`,
greedy completions equal to transformers' ``generate``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.serving import RunningServer, serve_script
from tests.llm.tiny_models import LLAMA_LIKE

pytestmark = pytest.mark.timeout(240)

SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "128"}
FAMILIES = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, RunningServer]]:
    from tests.llm.tiny_models import build_family_checkpoint

    name = f"tiny-{request.param}"
    directory = build_family_checkpoint(
        tmp_path_factory.mktemp(request.param) / name, request.param, FAMILIES[request.param]
    )
    with serve_script(
        "llm_serve.py", tmp_path_factory.mktemp("server"), env=SERVER_ENV, args=[str(directory)]
    ) as running:
        yield name, directory, running


def client_of(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_and_completions(served: tuple[str, Path, RunningServer]) -> None:
    name, directory, server = served
    client = client_of(server)
    assert [m.id for m in client.models.list().data] == [name]
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8

    import torch
    from transformers import AutoModelForCausalLM

    from tests.llm.tiny_models import reference_tokenizer

    prompt = "The quick brown fox"
    completion = client.completions.create(
        model=name, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    tokenizer = reference_tokenizer(directory)
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert completion.choices[0].text == tokenizer.decode(generated[0, len(ids) :])
