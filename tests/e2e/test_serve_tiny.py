"""`servekit serve` on a tiny random checkpoint: OpenAI and native endpoints over real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serving import RunningServer, serve_script

pytestmark = pytest.mark.timeout(180)

SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "512"}
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.llm.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve_script(
        "llm_serve.py", tmp_path_factory.mktemp("server"), env=SERVER_ENV, args=[str(tiny_model)]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def metrics(server: RunningServer) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)  # polling server state through its public endpoint, bounded
    raise AssertionError("condition not met in time")


# ------------------------------------------------------------------------------------ models
def test_models(server: RunningServer, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    missing = httpx.get(f"{server.url}/v1/models/other")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# -------------------------------------------------------------------------------------- chat
def test_chat_stream_joins_to_non_stream_text(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content


def test_chat_raw_sse_framing(server: RunningServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True, "n": 2, "seed": 1}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["index"] for c in chunks[0]["choices"]} == {0, 1}
    assert all(c["delta"]["role"] == "assistant" for c in chunks[0]["choices"])
    finished = [
        (ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"] if ch["finish_reason"]
    ]
    assert sorted(finished) == [(0, "length"), (1, "length")]


def test_chat_n_logprobs_and_stop(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=6, n=2, logprobs=True, top_logprobs=3, seed=3
    )
    assert [c.index for c in result.choices] == [0, 1]
    for choice in result.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 6
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    greedy = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0
    )
    text = greedy.choices[0].message.content or ""
    assert len(text) >= 2
    stop = text[1:3] if text[1:3].strip() else text[1:2]
    cut = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_async_client(server: RunningServer) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="tiny-llama", messages=MESSAGES, max_tokens=4, temperature=0
                    )
                    for _ in range(4)
                )
            )
            return [r.choices[0].message.content or "" for r in replies]

    texts = asyncio.run(run())
    assert len(set(texts)) == 1  # greedy: concurrent (batched) requests agree


# ------------------------------------------------------------------------------- completions
def test_completions_prompt_forms(client: openai.OpenAI) -> None:
    one = client.completions.create(model="tiny-llama", prompt="hello world", max_tokens=5, temperature=0)
    assert len(one.choices) == 1 and one.choices[0].finish_reason == "length"
    assert one.usage is not None and one.usage.completion_tokens == 5
    tokenized = httpx.post(
        f"{client.base_url}".removesuffix("/v1/") + "/tokenize", json={"prompt": "hello world"}
    ).json()["tokens"]
    by_ids = client.completions.create(model="tiny-llama", prompt=tokenized, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    many = client.completions.create(
        model="tiny-llama", prompt=["hello world", "a b c"], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text[: len(many.choices[0].text)]
    lists = client.completions.create(
        model="tiny-llama", prompt=[tokenized, tokenized], max_tokens=2, temperature=0
    )
    assert len(lists.choices) == 2 and lists.choices[0].text == lists.choices[1].text


def test_completions_echo_logprobs_stream(client: openai.OpenAI) -> None:
    echoed = client.completions.create(
        model="tiny-llama", prompt="hello world", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = echoed.choices[0]
    assert choice.text.startswith("hello world")
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert choice.logprobs.token_logprobs is not None and choice.logprobs.token_logprobs[0] is None
    kwargs = {"model": "tiny-llama", "prompt": "once upon", "max_tokens": 10, "seed": 11}
    full = client.completions.create(**kwargs)  # type: ignore[call-overload]
    parts = list(client.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("include_usage", [False, True])
def test_completions_raw_sse_chunks(server: RunningServer, include_usage: bool) -> None:
    """Every chunk of a completions stream has the OpenAI layout (fields in order, the usage field
    only when asked), the texts join to the whole answer, and the stream ends with usage and
    [DONE]: with one prompt and one choice (the chunks' fast path) and with n=2 over two prompts."""
    for prompts, n in (("once upon", 1), (["once upon", "a b c"], 2)):
        body = {"prompt": prompts, "max_tokens": 9, "temperature": 0, "n": n, "ignore_eos": True}
        whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        streamed = {**body, "stream": True, "stream_options": {"include_usage": include_usage}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=streamed, timeout=60) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        fields = ["id", "object", "created", "model", "choices", *(["usage"] if include_usage else [])]
        assert all(list(chunk) == fields for chunk in chunks)
        assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
        assert chunks[0]["id"].startswith("cmpl-") and chunks[0]["object"] == "text_completion"
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["finish_reason"] is not None:
                    finishes[choice["index"]] = choice["finish_reason"]
        assert texts == {c["index"]: c["text"] for c in whole["choices"]}
        assert finishes == {c["index"]: "length" for c in whole["choices"]}
        if include_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
            assert all(c["usage"] is None for c in chunks[:-1])
        else:
            assert all(c["choices"] for c in chunks)


def test_errors(server: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-llama", prompt="x", temperature=-1)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as suffix:
        client.completions.create(model="tiny-llama", prompt="x", suffix="y")
    assert suffix.value.body["param"] == "suffix"  # type: ignore[index]
    long_prompt = "word " * 2000
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"prompt": long_prompt, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 400
        error = json.loads(response.read())["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    bias = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "logit_bias": {"999999": 1}}
    )
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    not_json = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope")
    assert not_json.status_code == 400
    empty = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    # 0 is valid on the wire (a LitServer OpenAISpec passes it to the user's model); the engine refuses it.
    for field in ("max_tokens", "max_completion_tokens"):
        zero = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, field: 0})
        assert zero.status_code == 400 and zero.json()["error"]["param"] == field


def test_context_limit_finishes_with_length(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="tiny-llama",
        prompt="word " * 100,
        max_tokens=100000,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.total_tokens == 512


def test_disconnect_aborts_and_frees_kv(server: RunningServer) -> None:
    before = metrics(server)
    cancelled_key = 'servekit:request_success_total{model_name="tiny-llama",finished_reason="cancelled"}'
    body = {"messages": MESSAGES, "max_tokens": 450, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    wait_for(lambda: metrics(server).get(cancelled_key, 0) == before.get(cancelled_key, 0) + 1)
    after = metrics(server)
    assert after['servekit:num_requests_running{model_name="tiny-llama"}'] == 0
    total = after['servekit:num_kv_blocks{model_name="tiny-llama"}']
    assert after['servekit:num_free_kv_blocks{model_name="tiny-llama"}'] == total


# -------------------------------------------------------------------------------- defaults
# The vLLM serverless worker's tables (runpod-workers/worker-vllm README): (parameter, its default,
# another value). A seeded request without the parameter equals one that sends the default, and
# differs from one that sends the other value (so the first check can fail).
SHARED_DEFAULTS = [
    ("top_p", 1.0, 0.3),
    ("top_k", -1, 2),
    ("min_p", 0.0, 0.5),
    ("presence_penalty", 0.0, 2.0),
    ("frequency_penalty", 0.0, 2.0),
    ("repetition_penalty", 1.0, 1.9),
]
CHAT_DEFAULTS = [("temperature", 0.7, 1.0), *SHARED_DEFAULTS]
COMPLETION_DEFAULTS = [("temperature", 1.0, 0.7), *SHARED_DEFAULTS]


def seeded_text(server: RunningServer, route: str, **fields: object) -> str:
    body: dict[str, object] = {"max_tokens": 24, "seed": 5, "ignore_eos": True, **fields}
    if route == "chat":
        body["messages"] = MESSAGES
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
        return str(reply["choices"][0]["message"]["content"])
    body["prompt"] = "once upon a time"
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    return str(reply["choices"][0]["text"])


@pytest.mark.parametrize(
    ("route", "name", "default", "other"),
    [("chat", *case) for case in CHAT_DEFAULTS] + [("completion", *case) for case in COMPLETION_DEFAULTS],
)
def test_sampling_defaults(
    server: RunningServer, route: str, name: str, default: float, other: float
) -> None:
    implicit = seeded_text(server, route)
    assert implicit
    assert seeded_text(server, route, **{name: default}) == implicit
    assert seeded_text(server, route, **{name: None}) == implicit  # null is the default too
    assert seeded_text(server, route, **{name: other}) != implicit


def test_max_tokens_and_n_defaults(server: RunningServer) -> None:
    completion = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "once upon a time", "ignore_eos": True, "seed": 2}
    ).json()
    assert len(completion["choices"]) == 1 and completion["usage"]["completion_tokens"] == 16
    assert completion["choices"][0]["finish_reason"] == "length"
    sixteen = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "once upon a time", "ignore_eos": True, "seed": 2, "max_tokens": 16},
    ).json()
    assert sixteen["choices"][0]["text"] == completion["choices"][0]["text"]
    chat = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "ignore_eos": True}, timeout=120
    ).json()
    assert len(chat["choices"]) == 1 and chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"]["total_tokens"] == 512  # no max_tokens: up to the context


# ------------------------------------------------------------------------------------ native
def test_generate(server: RunningServer) -> None:
    url = f"{server.url}/generate"
    single = httpx.post(
        url,
        json={
            "text": "hello",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "return_logprob": True,
        },
    ).json()
    assert single["meta_info"]["completion_tokens"] == 4
    assert single["meta_info"]["finish_reason"]["type"] == "length"
    assert len(single["meta_info"]["output_token_logprobs"]) == 4
    batch = httpx.post(
        url, json={"text": ["hello", "world"], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    ).json()
    assert len(batch) == 2 and batch[0]["text"] == single["text"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello"}).json()["tokens"]
    by_ids = httpx.post(
        url, json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    )
    assert by_ids.json()["text"] == single["text"]
    with httpx.stream(
        "POST",
        url,
        json={"text": "hello", "stream": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
    ) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["text"] == single["text"]
    bad = httpx.post(url, json={"text": "x", "sampling_params": {"bogus": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampling_params.bogus"


def test_abort_request_by_rid(server: RunningServer) -> None:
    body = {
        "text": "hello",
        "rid": "job-1",
        "stream": True,
        "sampling_params": {"max_new_tokens": 480, "ignore_eos": True},
    }
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        aborted = httpx.post(f"{server.url}/abort_request", json={"rid": "job-1"}).json()
        assert aborted == {"aborted": True}
        events = [line[len("data: ") :] for line in lines]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "meta_info" in last, last
    assert last["meta_info"]["finish_reason"] == {"type": "abort"}
    assert last["meta_info"]["completion_tokens"] < 480
    assert httpx.post(f"{server.url}/abort_request", json={"rid": "job-1"}).json() == {"aborted": False}


def test_tokenize_detokenize_flush(server: RunningServer) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("hello world")
    chat_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat_tokens["count"] > tokens["count"]
    prompt = {"prompt": "the same long prompt " * 8, "max_tokens": 1}
    httpx.post(f"{server.url}/v1/completions", json=prompt)
    hits = 'servekit:prefix_cache_hits_total{model_name="tiny-llama"}'
    first = metrics(server)[hits]
    httpx.post(f"{server.url}/v1/completions", json=prompt)
    assert metrics(server)[hits] > first  # the second request reused the cached prefix
    assert httpx.post(f"{server.url}/flush_cache").json()["flushed"] is True
    flushed = metrics(server)[hits]
    httpx.post(f"{server.url}/v1/completions", json=prompt)
    assert metrics(server)[hits] == flushed  # nothing left to reuse


def test_encode_as_lmdeploy(server: RunningServer, tiny_model: Path) -> None:
    from servekit.client import APIClient
    from servekit.llm.tokenizer import Tokenizer

    client = APIClient(server.url)
    bos = Tokenizer.from_dir(tiny_model).bos_token_id
    assert bos is not None
    plain = httpx.post(
        f"{server.url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}
    ).json()["tokens"]
    assert plain[0] != bos
    ids, length = client.encode("hello world")
    assert ids == [bos, *plain] and length == len(ids)
    assert client.encode("hello world", add_bos=False) == (plain, len(plain))
    many, lengths = client.encode(["hello world", "a b c"], add_bos=False)
    assert many[0] == plain and lengths == [len(plain), len(many[1])]  # type: ignore[arg-type, index]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    chat_ids = [t for t in chat["tokens"] if t != bos]
    preprocessed, _ = client.encode("hi", do_preprocess=True, add_bos=False)
    assert preprocessed == chat_ids and len(chat_ids) > len(client.encode("hi", add_bos=False)[0])  # type: ignore[arg-type]
    raw = httpx.post(f"{server.url}/v1/encode", json={"input": "hello world"}).json()
    assert raw == {"input_ids": [bos, *plain], "length": len(plain) + 1}
    bad = httpx.post(f"{server.url}/v1/encode", json={"input": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_interactive_session(server: RunningServer) -> None:
    url = f"{server.url}/v1/chat/interactive"
    first = httpx.post(
        url,
        json={
            "prompt": "hi there",
            "session_id": 5,
            "interactive_mode": True,
            "max_tokens": 4,
            "temperature": 0,
        },
    ).json()
    assert first["finish_reason"] == "length" and first["history_tokens"] == 0
    hits = 'servekit:prefix_cache_hits_total{model_name="tiny-llama"}'
    before = metrics(server)[hits]
    with httpx.stream(
        "POST",
        url,
        json={
            "prompt": "and then?",
            "session_id": 5,
            "interactive_mode": True,
            "stream": True,
            "max_tokens": 4,
        },
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["history_tokens"] == first["input_tokens"] + first["tokens"]
    assert lines[-1]["input_tokens"] > first["input_tokens"] + first["tokens"]
    assert metrics(server)[hits] > before  # the earlier turn came from the prefix cache
    ended = httpx.post(url, json={"session_id": 5, "end": True}).json()
    assert ended["ended"] is True
    again = httpx.post(
        url, json={"prompt": "hi there", "session_id": 5, "interactive_mode": True, "max_tokens": 4}
    )
    assert again.json()["history_tokens"] == 0


def test_info_metrics_docs(server: RunningServer) -> None:
    completion = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert completion.status_code == 200
    info = httpx.get(f"{server.url}/server_info").json()
    assert info["config"]["max_model_len"] == 512
    assert info["config"]["sources"]["max_model_len"] == "env SERVEKIT_MAX_MODEL_LEN"
    model = httpx.get(f"{server.url}/model_info").json()
    assert model["model_name"] == "tiny-llama" and model["max_model_len"] == 512
    assert (model["dtype"], model["quantization"], model["kv_cache_dtype"]) == ("float32", None, "float32")
    assert info["config"]["quantization"] == "none"
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE servekit:num_requests_running gauge" in text
    forward = [line for line in text.splitlines() if line.startswith("servekit:engine_forward_seconds_total")]
    assert len(forward) == 1 and float(forward[0].split()[-1]) > 0  # the completion above ran
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/generate", "/tokenize"} <= set(paths)
    embeddings = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"})
    assert embeddings.status_code == 400


def test_litellm(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    for prefix in ("openai", "hosted_vllm"):
        reply = litellm.completion(
            model=f"{prefix}/tiny-llama",
            api_base=f"{server.url}/v1",
            api_key="x",
            messages=MESSAGES,
            max_tokens=4,
            temperature=0,
        )
        assert reply.choices[0].finish_reason == "length"  # type: ignore[union-attr]
        streamed = litellm.completion(
            model=f"{prefix}/tiny-llama",
            api_base=f"{server.url}/v1",
            api_key="x",
            messages=MESSAGES,
            max_tokens=4,
            temperature=0,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)  # type: ignore[union-attr]
        assert text == reply.choices[0].message.content  # type: ignore[union-attr]


# ---------------------------------------------------------------- auth, queue limit, env names
def test_auth_queue_limit_and_vllm_env_names(tiny_model: Path, tmp_path: Path) -> None:
    key = "k-123"
    env = {
        "SERVEKIT_NUM_THREADS": "1",
        "SERVEKIT_API_KEY": key,
        "MAX_MODEL_LENGTH": "256",
        "MAX_CONCURRENCY": "1",
        "MAX_NUM_SEQS": "1",
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model",
        "SERVEKIT_TEST_ENGINE_STEP_DELAY_S": "0.02",  # requests stay running while the test looks
    }
    auth = {"Authorization": f"Bearer {key}"}
    with serve_script("llm_serve.py", tmp_path, env=env, args=[str(tiny_model)]) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
        denied = httpx.get(f"{server.url}/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert httpx.post(f"{server.url}/generate", json={"text": "x"}).status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": key}).json()
        assert models["data"][0]["id"] == "my-model" and models["data"][0]["max_model_len"] == 256
        info = httpx.get(f"{server.url}/server_info", headers=auth).json()
        assert info["config"]["api_key"] == "***" and key not in json.dumps(info)
        assert info["config"]["max_queued_requests"] == 1

        long_body = {"prompt": "go", "max_tokens": 200, "stream": True, "extra": 1, "ignore_eos": True}
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json=long_body, headers=auth, timeout=60) as running:
            assert running.status_code == 200  # its first chunk came: it runs (max_num_seqs=1)
            # A second request waits in the engine queue (its response starts when it runs).
            second = threading.Thread(
                target=httpx.post,
                args=(url,),
                kwargs={"json": {"prompt": "x"}, "headers": auth, "timeout": 60},
            )
            second.start()
            waiting = 'servekit:num_requests_waiting{model_name="my-model"} 1.0'
            wait_for(lambda: waiting in httpx.get(f"{server.url}/metrics", headers=auth).text)
            refused = httpx.post(url, json={"prompt": "x"}, headers=auth)
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
        second.join(60)
        assert not second.is_alive()


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for child in map(int, children) for d in (child, *descendants(child))]


def test_api_key_and_config_reach_the_workers_as_arguments(tiny_model: Path, tmp_path: Path) -> None:
    """The front resolves the config once: the workers get it (and the key) as arguments, so neither the
    key in their environment nor env vars set after resolving change what they serve."""
    key = "k-flag-456"
    args = [str(tiny_model), "--api-key", key, "--max-model-len", "256"]
    with serve_script("llm_serve_env_changed.py", tmp_path, env=SERVER_ENV, args=args) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": key}).json()
        assert (models["data"][0]["id"], models["data"][0]["max_model_len"]) == ("tiny-llama", 256)
        info = httpx.get(f"{server.url}/server_info", headers={"Authorization": f"Bearer {key}"}).json()
        assert info["config"]["api_key"] == "***" and key not in json.dumps(info)
        assert info["config"]["sources"]["api_key"] == "flag"
        assert info["config"]["max_model_len"] == 256 and info["config"]["sources"]["max_model_len"] == "flag"
        processes = descendants(server.process.pid)
        assert processes  # the inference worker, at least
        for pid in processes:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert key.encode() not in environ and b"LIT_SERVER_API_KEY" not in environ
