"""The LiteLLM provider (``servekit.integrations.litellm``) through ``litellm`` itself: against a real
``servekit serve`` on a tiny random checkpoint, in-process, and against the embedding/image specs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import openai
import pytest

from tests.e2e.apps.openai_embedding import toy_vector
from tests.e2e.serving import RunningServer, serve_script
from tests.e2e.test_client_serve import TOOLS
from tests.integrations.conftest import API_KEY, MODEL

pytestmark = pytest.mark.timeout(600)

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch of the cost map
    import litellm

    from servekit.integrations.litellm import ServekitLLM, handler

    previous = litellm.custom_provider_map
    local = ServekitLLM(engine_options={"num_threads": 1, "max_model_len": 512})
    litellm.custom_provider_map = [
        {"provider": "servekit", "custom_handler": handler},
        {"provider": "servekitlocal", "custom_handler": local},  # no api_base: in-process
    ]
    yield litellm
    litellm.custom_provider_map = previous
    local.shutdown()


@pytest.fixture(scope="module")
def direct(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def remote(server: RunningServer, v1: bool = False) -> dict[str, Any]:
    return {"api_base": f"{server.url}/v1" if v1 else server.url, "api_key": API_KEY}


SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 11, "top_p": 0.9, "extra_body": {"ignore_eos": True}}


def test_completion_matches_the_server_and_params_reach_the_model(
    litellm: Any, server: RunningServer, direct: openai.OpenAI
) -> None:
    expected = direct.chat.completions.create(model=MODEL, messages=MESSAGES, **SAMPLING)  # type: ignore[call-overload]
    for v1 in (False, True):
        reply = litellm.completion(
            model=f"servekit/{MODEL}", messages=MESSAGES, **SAMPLING, **remote(server, v1)
        )
        assert reply.choices[0].message.content == expected.choices[0].message.content
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 8
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
        assert reply.model == MODEL
    other_seed = litellm.completion(
        model=f"servekit/{MODEL}", messages=MESSAGES, **{**SAMPLING, "seed": 12}, **remote(server)
    )
    assert other_seed.choices[0].message.content != expected.choices[0].message.content
    stopped = litellm.completion(
        model=f"servekit/{MODEL}", messages=MESSAGES, **SAMPLING, stop=["e"], **remote(server)
    )
    assert "e" not in stopped.choices[0].message.content


def test_streaming_joins_to_the_same_text_with_usage_last(litellm: Any, server: RunningServer) -> None:
    options = {"model": f"servekit/{MODEL}", "messages": MESSAGES, **SAMPLING, **remote(server)}
    full = litellm.completion(**options)
    chunks = list(litellm.completion(stream=True, stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == 8


def test_async_completion_and_streaming(litellm: Any, server: RunningServer) -> None:
    options = {"model": f"servekit/{MODEL}", "messages": MESSAGES, **SAMPLING, **remote(server)}

    async def both() -> tuple[str, str]:
        reply = await litellm.acompletion(**options)
        stream = await litellm.acompletion(stream=True, **options)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return reply.choices[0].message.content, text

    full, streamed = asyncio.run(both())
    assert full == streamed and full


def test_tools_and_response_format_reach_the_model(litellm: Any, server: RunningServer) -> None:
    options = {"model": f"servekit/{MODEL}", "messages": [{"role": "user", "content": "Add 1 and 2"}]}
    options |= {"temperature": 1.0, "seed": 1, "max_tokens": 300, **remote(server)}
    reply = litellm.completion(tools=TOOLS, tool_choice="required", **options)
    assert reply.choices[0].finish_reason == "tool_calls"
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])

    chunks = list(litellm.completion(tools=TOOLS, tool_choice="required", stream=True, **options))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "add"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(arguments), TOOLS[0]["function"]["parameters"])

    as_json = litellm.completion(response_format={"type": "json_object"}, **options)
    assert isinstance(json.loads(as_json.choices[0].message.content), dict)


def test_errors_keep_the_servers_status_and_message(litellm: Any, server: RunningServer) -> None:
    with pytest.raises(litellm.BadRequestError) as bad:
        litellm.completion(model=f"servekit/{MODEL}", messages=MESSAGES, temperature=5, **remote(server))
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(litellm.NotFoundError) as missing:
        litellm.completion(model="servekit/no-such-model", messages=MESSAGES, **remote(server))
    assert missing.value.status_code == 404
    with pytest.raises(litellm.AuthenticationError) as unauthorised:
        litellm.completion(model=f"servekit/{MODEL}", messages=MESSAGES, api_base=server.url, api_key="wrong")
    assert unauthorised.value.status_code == 401
    with pytest.raises(litellm.BadRequestError) as in_stream:
        list(
            litellm.completion(
                model=f"servekit/{MODEL}", messages=MESSAGES, stream=True, n=0, **remote(server)
            )
        )
    assert in_stream.value.status_code == 400 and "n" in str(in_stream.value)


def test_in_process_model_loaded_once(litellm: Any, tiny_model: Path, server: RunningServer) -> None:
    options = {"messages": MESSAGES, **SAMPLING}
    expected = litellm.completion(model=f"servekit/{MODEL}", **options, **remote(server))
    reply = litellm.completion(model=f"servekitlocal/{tiny_model}", **options)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage.completion_tokens == 8 and reply.model == MODEL
    streamed = litellm.completion(model=f"servekitlocal/{tiny_model}", stream=True, **options)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == expected.choices[0].message.content

    async def in_loop() -> str:
        stream = await litellm.acompletion(model=f"servekitlocal/{tiny_model}", stream=True, **options)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(in_loop()) == expected.choices[0].message.content
    local = litellm.custom_provider_map[1]["custom_handler"]
    assert local.loaded_models() == [str(tiny_model)]  # one engine, whatever the number of calls
    with pytest.raises(litellm.BadRequestError) as bad:
        litellm.completion(model=f"servekitlocal/{tiny_model}", messages=MESSAGES, top_p=0)
    assert "top_p" in str(bad.value)
    with pytest.raises(litellm.BadRequestError) as no_embeddings:
        litellm.embedding(model=f"servekitlocal/{tiny_model}", input=["x"])
    assert "not an embedding model" in str(no_embeddings.value)


def test_embeddings(litellm: Any, tmp_path: Path) -> None:
    with serve_script("openai_embedding.py", tmp_path) as embedder:
        reply = litellm.embedding(
            model="servekit/toy-embed", input=["hello world", "x"], api_base=embedder.url
        )
        assert len(reply.data) == 2
        for item, text in zip(reply.data, ["hello world", "x"], strict=True):
            np.testing.assert_allclose(item["embedding"], toy_vector(text), atol=1e-6)
        assert reply.usage.prompt_tokens == 3

        async def in_loop() -> Any:
            return await litellm.aembedding(
                model="servekit/toy-embed", input=["x"], api_base=f"{embedder.url}/v1"
            )

        assert len(asyncio.run(in_loop()).data) == 1
        with pytest.raises(litellm.InternalServerError) as failed:
            litellm.embedding(model="servekit/toy-embed", input=["fail"], api_base=embedder.url)
        assert failed.value.status_code == 500


def decoded(data_or_url: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(data_or_url.removeprefix("data:image/png;base64,"))
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_image_generation(litellm: Any, tmp_path: Path) -> None:
    from tests.e2e.apps.openai_image import draw

    with serve_script("openai_image.py", tmp_path) as painter:
        plain = litellm.image_generation(model="servekit/pattern", prompt="a fox", api_base=painter.url)
        np.testing.assert_array_equal(decoded(plain.data[0].url), draw("a fox", 0, 32, 24))  # default size
        # LiteLLM drops size, n and response_format before calling a custom provider: extra_body has them.
        options = {"size": "16x8", "n": 2, "response_format": "b64_json"}
        sized = litellm.image_generation(
            model="servekit/pattern", prompt="a fox", extra_body=options, api_base=painter.url
        )
        assert len(sized.data) == 2
        np.testing.assert_array_equal(decoded(sized.data[1].b64_json), draw("a fox", 1, 16, 8))

        async def in_loop() -> Any:
            return await litellm.aimage_generation(
                model="servekit/pattern", prompt="a fox", extra_body=options, api_base=painter.url
            )

        assert len(asyncio.run(in_loop()).data) == 2
        with pytest.raises(litellm.InternalServerError):
            litellm.image_generation(model="servekit/pattern", prompt="fail", api_base=painter.url)


def test_overload_statuses_stay_what_the_server_answered(litellm: Any, tmp_path: Path) -> None:
    with serve_script("openai_status.py", tmp_path) as status_server:
        options = {"model": "servekit/any", "api_base": status_server.url, "num_retries": 0}
        assert litellm.completion(messages=[{"role": "user", "content": "hi"}], **options).choices
        for status, error_type in ((429, litellm.RateLimitError), (503, litellm.ServiceUnavailableError)):
            with pytest.raises(error_type) as error:
                litellm.completion(messages=[{"role": "user", "content": f"status:{status}"}], **options)
            assert error.value.status_code == status and f"status:{status}" in str(error.value)
