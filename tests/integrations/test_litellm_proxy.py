"""The real LiteLLM proxy (``litellm --config``) with deploy/litellm/config.yaml in front of real
servekit servers: chat (streaming or not), embeddings, images, and overload statuses kept."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml

from tests.e2e.apps.openai_embedding import toy_vector
from tests.e2e.serving import REPO, RunningServer, serve_command, serve_script
from tests.integrations.conftest import API_KEY, MODEL

pytestmark = pytest.mark.timeout(600)

CONFIG = REPO / "deploy" / "litellm" / "config.yaml"
MASTER_KEY = "sk-proxy-master"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}  # the proxy answers 500 without it
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]
SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 5}


def test_config_is_the_documented_one() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    [provider] = config["litellm_settings"]["custom_provider_map"]
    assert provider == {"provider": "servekit", "custom_handler": "servekit.integrations.litellm.handler"}
    assert all(m["litellm_params"]["model"].startswith("servekit/") for m in config["model_list"])
    assert config["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"


@pytest.fixture(scope="module")
def proxy(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("proxy")
    with (
        serve_script("openai_embedding.py", work) as embedder,
        serve_script("openai_image.py", work) as painter,
        serve_script("openai_status.py", work) as status,
    ):
        config = yaml.safe_load(CONFIG.read_text())
        models = {entry["model_name"]: entry for entry in config["model_list"]}
        models["smollm2"]["litellm_params"]["model"] = f"servekit/{MODEL}"  # what the test server serves
        config["model_list"].append(
            {"model_name": "status", "litellm_params": {"model": "servekit/status", "api_base": status.url}}
        )
        env = {
            "SERVEKIT_API_BASE": f"{server.url}/v1",
            "SERVEKIT_API_KEY": API_KEY,
            "SERVEKIT_EMBEDDINGS_API_BASE": embedder.url,
            "SERVEKIT_IMAGES_API_BASE": painter.url,
        }
        with litellm_proxy(config, work, env) as running:
            yield running


@contextlib.contextmanager
def litellm_proxy(config: dict[str, Any], work: Path, env: dict[str, str]) -> Iterator[RunningServer]:
    """The real proxy CLI with ``config`` (written into ``work``), on 127.0.0.1, offline."""
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY, **env}
    litellm_cli = str(Path(sys.executable).parent / "litellm")
    command = [litellm_cli, "--config", str(path), "--host", "127.0.0.1", "--port", "{port}"]
    # Importing litellm's proxy takes a while on a loaded machine: a longer bound than for servekit.
    with serve_command(
        command, work, env=env, health_path="/health/liveliness", startup_timeout=180
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(proxy: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key=MASTER_KEY, max_retries=0, timeout=120)


def test_chat_through_the_proxy_is_the_servers_answer(
    client: openai.OpenAI, server: RunningServer, proxy: RunningServer
) -> None:
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    expected = direct.chat.completions.create(model=MODEL, messages=MESSAGES, **SAMPLING)  # type: ignore[call-overload]
    reply = httpx.post(
        f"{proxy.url}/chat/completions",
        json={"model": "smollm2", "messages": MESSAGES, **SAMPLING},
        headers=AUTH,
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == expected.choices[0].message.content
    assert body["usage"]["completion_tokens"] == expected.usage.completion_tokens

    stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, stream=True, **SAMPLING)  # type: ignore[call-overload]
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == body["choices"][0]["message"]["content"]
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        expected.choices[0].finish_reason
    ]


def test_embeddings_through_the_proxy(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="embeddings", input=["hello world", "x"])
    assert [item.index for item in reply.data] == [0, 1]
    for item, text in zip(reply.data, ["hello world", "x"], strict=True):
        np.testing.assert_allclose(item.embedding, toy_vector(text), atol=1e-6)


def test_images_through_the_proxy(client: openai.OpenAI) -> None:
    from PIL import Image

    from tests.e2e.apps.openai_image import draw

    reply = client.images.generate(model="images", prompt="a fox")
    data: Any = reply.data
    url = data[0].url or ""
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"))))
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), draw("a fox", 0, 32, 24))


@pytest.mark.parametrize("status", [429, 503])
def test_overload_statuses_stay_429_and_503(proxy: RunningServer, status: int) -> None:
    body = {"model": "status", "messages": [{"role": "user", "content": f"status:{status}"}]}
    reply = httpx.post(f"{proxy.url}/chat/completions", json=body, headers=AUTH, timeout=120)
    assert reply.status_code == status, reply.text
    assert f"status:{status}" in reply.json()["error"]["message"]


def test_a_local_custom_handler_file(server: RunningServer, tmp_path: Path) -> None:
    shutil.copy(CONFIG.parent / "custom_handler.py", tmp_path)  # next to the config, as LiteLLM looks for it
    config = {
        "model_list": [{"model_name": "tiny", "litellm_params": {"model": f"servekit/{MODEL}"}}],
        "litellm_settings": {
            "custom_provider_map": [{"provider": "servekit", "custom_handler": "custom_handler.handler"}]
        },
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    env = {"SERVEKIT_API_BASE": server.url, "SERVEKIT_API_KEY": API_KEY}  # the handler's defaults
    with litellm_proxy(config, tmp_path, env) as proxy:
        body = {"model": "tiny", "messages": MESSAGES, **SAMPLING}
        reply = httpx.post(f"{proxy.url}/chat/completions", json=body, headers=AUTH, timeout=120)
        assert reply.status_code == 200, reply.text
        direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        expected = direct.chat.completions.create(model=MODEL, messages=MESSAGES, **SAMPLING)  # type: ignore[call-overload]
        assert reply.json()["choices"][0]["message"]["content"] == expected.choices[0].message.content
