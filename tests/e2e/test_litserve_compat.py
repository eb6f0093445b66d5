"""LitServe code run as written against servekit: batched streaming with LitServe's hook contract
(plain and behind OpenAISpec), OpenAISpec with async hooks."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(180)

GREETING = "Hi! It's nice to meet you. Is there something I can help you with or would you like to chat? "


def _chat(client: httpx.Client, url: str, text: str, stream: bool) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
    reply = client.post(f"{url}/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    if not stream:
        return reply.json()
    events = [line[len("data: ") :] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


def _streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def _two_at_once(url: str, texts: list[str], stream: bool) -> list[Any]:
    """Two requests sent together, so that they fall into one batch window (their answers do not
    depend on it)."""
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda text: _chat(client, url, text, stream), texts))


def test_openai_batched_stream_with_encode_response_on_the_batch(tmp_path: Path) -> None:
    with serve_script("litserve_compat.py", tmp_path, env={"APP": "batch_context"}) as server:
        whole = _two_at_once(server.url, ["a", "b"], stream=False)
        assert [r["choices"][0]["message"]["content"] for r in whole] == [GREETING, GREETING]
        streamed = _two_at_once(server.url, ["a", "b"], stream=True)
        assert [_streamed_text(chunks) for chunks in streamed] == [GREETING, GREETING]
        assert "Traceback" not in server.log()


def test_openai_batched_stream_usage_per_request(tmp_path: Path) -> None:
    with serve_script("litserve_compat.py", tmp_path, env={"APP": "batch_usage"}) as server:
        for reply in _two_at_once(server.url, ["a", "b"], stream=False):
            assert reply["choices"][0]["message"]["content"] == "10 + 6 is equal to 16."
            assert reply["usage"] == {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}


def test_openai_batched_stream_with_the_specs_encode_response(tmp_path: Path) -> None:
    with serve_script("litserve_compat.py", tmp_path, env={"APP": "batch_default_encode"}) as server:
        whole = _two_at_once(server.url, ["a", "b"], stream=False)
        assert [r["choices"][0]["message"]["content"] for r in whole] == ["echo: a", "echo: b"]
        streamed = _two_at_once(server.url, ["c", "d"], stream=True)
        assert [_streamed_text(chunks) for chunks in streamed] == ["echo: c", "echo: d"]


def test_openai_spec_with_async_predict_and_async_encode_response(tmp_path: Path) -> None:
    with (
        serve_script("litserve_compat.py", tmp_path, env={"APP": "async"}) as server,
        httpx.Client(timeout=60) as client,
    ):
        assert _chat(client, server.url, "hi", stream=False)["choices"][0]["message"]["content"] == "async hi"
        assert _streamed_text(_chat(client, server.url, "there", stream=True)) == "async there"


def test_a_logger_holding_a_lock_runs_in_the_main_process_and_mounts_its_app(tmp_path: Path) -> None:
    with serve_script("litserve_loggers.py", tmp_path) as server, httpx.Client(timeout=30) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outputs = list(
                pool.map(
                    lambda i: client.post(f"{server.url}/predict", json={"input": i}).json(), range(1, 9)
                )
            )
        assert outputs == [{"output": 2 * i} for i in range(1, 9)]
        metrics: dict[str, Any] = {}
        waiter = threading.Event()
        for _ in range(400):  # the pairs reach the logger asynchronously (bounded: 20 s)
            metrics = client.get(f"{server.url}/metrics", follow_redirects=True).json()
            if metrics["totals"].get("inputs") == sum(range(1, 9)):
                break
            waiter.wait(0.05)
        assert metrics["totals"] == {"inputs": sum(range(1, 9))}
        # One logger, in the main process, saw the pairs of whichever workers served the requests.
        assert metrics["pid"] == server.process.pid
        assert 1 <= metrics["worker_pids"] <= 2
