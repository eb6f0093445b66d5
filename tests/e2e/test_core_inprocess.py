"""An API tested in-process through ``LitServer.app``: no port, but real worker processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import servekit as ls
from servekit.errors import WorkerSetupError
from servekit.testing import wrap_litserve_start
from servekit.utils import wrap_litserve_start as wrap_from_utils

pytestmark = pytest.mark.timeout(120)


class SquareAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = lambda x: x**2

    def decode_request(self, request: Any) -> Any:
        return request["input"]

    def predict(self, x: Any) -> Any:
        return self.model(x)

    def encode_response(self, output: Any) -> Any:
        return {"output": output, "pid": os.getpid()}


class WordsAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def decode_request(self, request: Any) -> Any:
        return request["prompt"]

    def predict(self, prompt: Any) -> Any:
        yield from prompt.split()

    def encode_response(self, outputs: Any) -> Any:
        for word in outputs:
            yield {"word": word}


class ServerSentWordsAPI(WordsAPI):
    """Frames its stream as server-sent events by overriding LitServe's ``format_encoded_response``."""

    def format_encoded_response(self, data: Any) -> Any:
        return f"data: {data['word']}\n\n"


class BatchedWordsAPI(WordsAPI):
    """LitServe's batched streaming: one output per request at each step."""

    def predict(self, prompts: Any) -> Any:
        for i in range(2):
            yield [f"{p}{i}" for p in prompts]

    def encode_response(self, steps: Any) -> Any:
        for outputs in steps:
            yield [{"word": o} for o in outputs]


class AsyncWordsAPI(WordsAPI):
    async def predict(self, prompt: Any) -> Any:
        for word in prompt.split():
            yield word


class AsyncSquareAPI(SquareAPI):
    async def predict(self, x: Any) -> Any:
        return x * x


class EventLog(ls.Callback):
    """Appends the name of every predict/encode event a worker fires to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, name: str) -> None:
        with open(self.path, "a") as f:
            f.write(name + "\n")

    def on_before_predict(self, *args: Any, **kwargs: Any) -> None:
        self._write("before_predict")

    def on_after_predict(self, *args: Any, **kwargs: Any) -> None:
        self._write("after_predict")

    def on_before_encode_response(self, *args: Any, **kwargs: Any) -> None:
        self._write("before_encode_response")

    def on_after_encode_response(self, *args: Any, **kwargs: Any) -> None:
        self._write("after_encode_response")


class GatedHealthAPI(SquareAPI):
    """``setup`` waits for a file; ``health`` counts the probes it was asked (in the front process)."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate
        self.probes = 0

    def setup(self, device: str) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        super().setup(device)

    def health(self) -> bool:
        self.probes += 1
        return True


class BrokenSetupAPI(SquareAPI):
    def setup(self, device: str) -> None:
        raise RuntimeError("no model here")


def _assert_nothing_left(server: ls.LitServer, pids: set[int]) -> None:
    assert multiprocessing.active_children() == []
    assert not Path(server._workers().endpoints.directory).exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_test_client_starts_and_stops_real_workers() -> None:
    server = ls.LitServer(SquareAPI(), accelerator="cpu", devices=1, workers_per_device=2, timeout=30)
    assert "/predict" in [getattr(route, "path", None) for route in server.app.routes]
    pids: set[int] = set()
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        assert client.get("/").text == "litserve running"
        # As in LitServe, startup does not wait for setup: requests made meanwhile wait for a worker.
        for value in range(4):
            reply = client.post("/predict", json={"input": float(value)})
            assert reply.status_code == 200
            assert reply.json()["output"] == value**2
            pids.add(reply.json()["pid"])
        waiter = threading.Event()
        for _ in range(600):  # bounded: 30 s for both workers to finish setup
            if client.get("/health").text == "ok":
                break
            waiter.wait(0.05)
        assert client.get("/health").text == "ok"
    assert os.getpid() not in pids  # predict ran in worker processes
    _assert_nothing_left(server, pids)
    # The app can be entered again: its lifespan starts fresh workers.
    with wrap_from_utils(server), TestClient(server.app) as client:
        again = client.post("/predict", json={"input": 3.0}).json()
    assert again["output"] == 9.0
    assert again["pid"] not in pids
    _assert_nothing_left(server, {again["pid"]})


def test_asgi_transport_streams_through_the_lifespan() -> None:
    server = ls.LitServer(WordsAPI(stream=True), accelerator="cpu", devices=1, timeout=30)

    async def scenario() -> list[str]:
        app = server.app
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
            client.stream("POST", "/predict", json={"prompt": "servekit streams words"}) as reply,
        ):
            assert reply.status_code == 200
            return [line async for line in reply.aiter_lines() if line]

    lines = asyncio.run(scenario())
    assert lines == ['{"word": "servekit"}', '{"word": "streams"}', '{"word": "words"}']  # as LitServe writes
    _assert_nothing_left(server, set())


def test_failed_setup_fails_requests_then_the_lifespan_and_leaves_nothing() -> None:
    server = ls.LitServer(BrokenSetupAPI(), accelerator="cpu", devices=1, timeout=30)
    with (
        wrap_litserve_start(server),
        pytest.raises(WorkerSetupError, match="no model here"),
        TestClient(server.app) as client,
    ):
        assert client.post("/predict", json={"input": 1.0}).status_code == 503
    _assert_nothing_left(server, set())


def test_format_encoded_response_frames_each_streamed_item() -> None:
    server = ls.LitServer(ServerSentWordsAPI(stream=True), accelerator="cpu", devices=1, timeout=30)
    with wrap_litserve_start(server) as s, TestClient(s.app) as client:
        reply = client.post("/predict", json={"prompt": "one two three"})
        assert reply.status_code == 200
        assert reply.text == "data: one\n\ndata: two\n\ndata: three\n\n"


@pytest.mark.parametrize(
    ("make_api", "body"),
    [
        (lambda: WordsAPI(stream=True), {"prompt": "a b"}),
        (lambda: BatchedWordsAPI(stream=True, max_batch_size=2, batch_timeout=0.01), {"prompt": "a"}),
        (lambda: AsyncWordsAPI(stream=True, enable_async=True), {"prompt": "a b"}),
        (lambda: AsyncSquareAPI(enable_async=True), {"input": 3}),
    ],
    ids=["stream", "batched-stream", "async-stream", "async"],
)
def test_every_loop_fires_the_predict_and_encode_callbacks(make_api: Any, body: Any, tmp_path: Path) -> None:
    log = tmp_path / "events"
    server = ls.LitServer(make_api(), accelerator="cpu", devices=1, callbacks=[EventLog(str(log))])
    with wrap_litserve_start(server) as s, TestClient(s.app) as client:
        assert client.post("/predict", json=body).status_code == 200
    events = log.read_text().split()
    assert sorted(events) == sorted(
        ["before_predict", "after_predict", "before_encode_response", "after_encode_response"]
    )
    assert events.index("before_predict") < events.index("after_predict")
    assert events.index("before_encode_response") < events.index("after_encode_response")


def test_health_asks_the_apis_own_check_even_before_the_workers_are_ready(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    api = GatedHealthAPI(str(gate))
    server = ls.LitServer(api, accelerator="cpu", devices=1)
    with wrap_litserve_start(server) as s, TestClient(s.app) as client:
        for _ in range(2):
            reply = client.get("/health")
            assert (reply.status_code, reply.text) == (503, "not ready")
        assert api.probes == 2  # asked although the worker is still in setup
        gate.write_text("open")
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.05)
        assert api.probes >= 3
