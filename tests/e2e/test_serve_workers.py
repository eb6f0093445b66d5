"""`servekit serve --workers 2`: control messages reach the right workers, sessions keep their KV."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import RunningServer, serve_script
from tests.e2e.test_serve_tiny import metrics, wait_for

pytestmark = pytest.mark.timeout(240)

SERVER_ENV = {
    "SERVEKIT_NUM_THREADS": "1",
    "SERVEKIT_MAX_MODEL_LEN": "512",
    "SERVEKIT_TEST_ENGINE_STEP_DELAY_S": "0.01",  # long generations stay running while a test looks
}
LONG = {"max_new_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from tests.llm.tiny_models import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")
    with serve_script(
        "llm_serve.py",
        tmp_path_factory.mktemp("server"),
        env=SERVER_ENV,
        args=[str(model), "--workers", "2"],
    ) as running:
        yield running


def worker_stats(server: RunningServer) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = httpx.get(f"{server.url}/server_info").json()["workers"]
    return workers


def running_per_worker(server: RunningServer) -> list[int]:
    return [w["engine"]["num_running"] for w in worker_stats(server)]


class HeldStream:
    """A long /generate stream with a known rid, read in a thread until it ends."""

    def __init__(self, server: RunningServer, rid: str, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.future = pool.submit(self._read, server, rid)

    @staticmethod
    def _read(server: RunningServer, rid: str) -> dict[str, Any]:
        body = {"text": "hold", "rid": rid, "stream": True, "sampling_params": LONG}
        with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=120) as response:
            events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last: dict[str, Any] = json.loads(events[-2])
        return last


def test_abort_reaches_the_worker_running_the_request(server: RunningServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = HeldStream(server, "held-a", pool)
        wait_for(lambda: sum(running_per_worker(server)) == 1)
        second = HeldStream(server, "held-b", pool)
        # The second went to the other, less loaded, worker: each worker runs one.
        wait_for(lambda: running_per_worker(server) == [1, 1])
        for rid in ("held-b", "held-a"):
            reply = httpx.post(f"{server.url}/abort_request", json={"rid": rid})
            assert reply.json() == {"aborted": True}
        for held in (first, second):
            meta = held.future.result(60)["meta_info"]
            assert meta["finish_reason"] == {"type": "abort"}
            assert meta["completion_tokens"] < LONG["max_new_tokens"]
    assert running_per_worker(server) == [0, 0]
    assert httpx.post(f"{server.url}/abort_request", json={"rid": "held-a"}).json() == {"aborted": False}


def _pair(server: RunningServer, prompt: str) -> list[dict[str, Any]]:
    """Two requests at once, each long enough that the second arrives while the first still loads
    its worker: the second goes to the other worker."""
    body = {"prompt": prompt, "max_tokens": 30, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(
            pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60), range(2))
        )
    assert [r.status_code for r in replies] == [200, 200]
    return [r.json() for r in replies]


def _per_worker(server: RunningServer, key: str) -> list[int]:
    return [w["engine"][key] for w in worker_stats(server)]


def test_flush_cache_empties_every_worker(server: RunningServer) -> None:
    prompt = "a prompt long enough to fill several cache blocks " * 6
    for _ in range(10):  # bounded: until both workers have served the prompt from their cache
        _pair(server, prompt)
        if all(hits > 0 for hits in _per_worker(server, "prefix_cache_hits")):
            break
    assert all(hits > 0 for hits in _per_worker(server, "prefix_cache_hits"))
    flushed = httpx.post(f"{server.url}/flush_cache")
    assert flushed.status_code == 200
    body = flushed.json()
    assert body["flushed"] is True
    assert [w["worker"] for w in body["workers"]] == [0, 1]
    assert all(w["flushed"] for w in body["workers"])
    queries = _per_worker(server, "prefix_cache_queries")
    replies = _pair(server, prompt)
    assert all(a > b for a, b in zip(_per_worker(server, "prefix_cache_queries"), queries, strict=True))
    # Each worker served one of the two, and neither had anything left to reuse.
    assert [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in replies] == [0, 0]


def test_metrics_count_each_request_once(server: RunningServer) -> None:
    key = 'servekit:requests_total{model_name="tiny-llama",kind="completion"}'
    before = metrics(server).get(key, 0.0)
    for _ in range(3):
        _pair(server, "count me")
    after = metrics(server)
    assert after[key] == before + 6
    per_worker = [after[f'servekit:num_kv_blocks{{model_name="tiny-llama",worker="{w}"}}'] for w in (0, 1)]
    assert after['servekit:num_kv_blocks{model_name="tiny-llama"}'] == sum(per_worker)


def test_interactive_session_stays_on_the_worker_with_its_cache(server: RunningServer) -> None:
    url = f"{server.url}/v1/chat/interactive"

    def turn(prompt: str) -> dict[str, Any]:
        body = {"prompt": prompt, "session_id": 11, "interactive_mode": True, "max_tokens": 4}
        reply = httpx.post(url, json={**body, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
        result: dict[str, Any] = reply.json()
        return result

    first = turn("tell me about foxes, the quick brown ones that jump over lazy dogs")
    assert first["cached_tokens"] == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A long request on the session's worker makes the other the least loaded one.
        held = HeldStream(server, "held-session", pool)
        wait_for(lambda: sum(running_per_worker(server)) == 1)
        second = turn("and then what happened?")
        third = turn("and after that?")
        assert httpx.post(f"{server.url}/abort_request", json={"rid": "held-session"}).json()["aborted"]
        held.future.result(60)
    assert second["cached_tokens"] > 0
    assert third["cached_tokens"] >= second["input_tokens"] // 16 * 16 > 0
    assert httpx.post(url, json={"session_id": 11, "end": True}).json()["ended"] is True


def test_health_and_info_cover_both_workers(server: RunningServer, tmp_path: Path) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    info = httpx.get(f"{server.url}/server_info").json()
    assert [w["worker"] for w in info["workers"]] == [0, 1]
    assert info["engine"]["num_kv_blocks"] == sum(w["engine"]["num_kv_blocks"] for w in info["workers"])
