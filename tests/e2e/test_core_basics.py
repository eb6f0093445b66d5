"""The serving core through real processes and real HTTP: the documented LitServe examples."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from tests.e2e.serving import serve_script, wait_for_text

pytestmark = pytest.mark.timeout(120)


def test_hello_world(tmp_path: Path) -> None:
    with serve_script("hello.py", tmp_path) as server:
        response = httpx.post(f"{server.url}/predict", json={"input": 4.0}, timeout=10)
        assert response.status_code == 200
        assert response.json() == {"output": 16.0}
        assert httpx.get(f"{server.url}/health", timeout=5).text == "ok"
        info = httpx.get(f"{server.url}/info", timeout=5).json()
        assert info["server"]["apis"][0]["api_path"] == "/predict"
        assert httpx.get(f"{server.url}/docs", timeout=5).status_code == 200
        assert "/predict" in httpx.get(f"{server.url}/openapi.json", timeout=5).json()["paths"]


def test_bad_input_gets_clear_4xx_and_others_are_unaffected(tmp_path: Path) -> None:
    with serve_script("hello.py", tmp_path, env={"MAX_PAYLOAD": "1000"}) as server:
        url = f"{server.url}/predict"
        malformed = httpx.post(url, content=b'{"input": 4', headers={"content-type": "application/json"})
        assert malformed.status_code == 400
        assert "not valid JSON" in malformed.json()["detail"]
        wrong_type = httpx.post(
            url, content=b"\x00\x01", headers={"content-type": "application/octet-stream"}
        )
        assert wrong_type.status_code == 415
        too_big = httpx.post(url, json={"input": 1.0, "pad": "x" * 5000})
        assert too_big.status_code == 413
        assert "larger than the limit" in too_big.json()["detail"]
        missing_key = httpx.post(url, json={"other": 1})
        assert missing_key.status_code == 500
        assert missing_key.json() == {"detail": "Internal server error"}
        assert httpx.post(url, json={"input": 3.0}).json() == {"output": 9.0}


def test_concurrent_requests_each_get_their_own_answer(tmp_path: Path) -> None:
    with serve_script("hello.py", tmp_path) as server, httpx.Client(timeout=30) as client:

        def call(i: int) -> float:
            return float(client.post(f"{server.url}/predict", json={"input": float(i)}).json()["output"])

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(200)))
        assert results == [float(i * i) for i in range(200)]


def test_torch_model_on_cpu_workers_per_device(tmp_path: Path) -> None:
    with serve_script("torch_api.py", tmp_path, env={"WORKERS": "2"}) as server:
        info = httpx.get(f"{server.url}/info", timeout=5).json()
        assert len(info["workers"]) == 2
        seen = set()
        with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda i: client.post(f"{server.url}/predict", json={"input": i}).json(), range(40))
            )
        for i, reply in enumerate(replies):
            assert reply["output"] == pytest.approx(2.0 * i + 1.0)
            assert reply["device"] == "cpu"
            seen.add(reply["worker"])
        assert seen == {"0", "1"}


def test_dynamic_batching_default_and_custom_batch(tmp_path: Path) -> None:
    with serve_script("batched.py", tmp_path, env={"BATCH": "4", "BATCH_TIMEOUT": "2"}) as server:
        with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(lambda i: client.post(f"{server.url}/predict", json={"input": i}).json(), range(4))
            )
            uppers = list(
                pool.map(
                    lambda t: client.post(f"{server.url}/upper", json={"text": t}).json(),
                    ["a", "b", "c", "d"],
                )
            )
        assert [r["square"] for r in replies] == [0.0, 1.0, 4.0, 9.0]
        # Four concurrent requests within a 2 s window fill one batch of max_batch_size=4.
        assert all(r["batch_size"] == 4 for r in replies)
        assert [u["upper"] for u in uppers] == ["A", "B", "C", "D"]
        assert all(u["n"] == 4 for u in uppers)


def test_batched_streaming_gives_each_request_its_own_stream(tmp_path: Path) -> None:
    env = {"BATCH": "4", "BATCH_TIMEOUT": "2"}
    with (
        serve_script("batched.py", tmp_path, env=env) as server,
        httpx.Client(timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        replies = list(
            pool.map(lambda t: client.post(f"{server.url}/stream", json={"text": t}).text, ["a", "b"])
        )
    # Both requests ran in one batch of 2; each stream carries only its own items.
    assert replies[0].splitlines() == ['{"output": "a0/2"}', '{"output": "a1/2"}', '{"output": "a2/2"}']
    assert replies[1].splitlines() == ['{"output": "b0/2"}', '{"output": "b1/2"}', '{"output": "b2/2"}']


def test_batch_window_closes_at_timeout_for_a_lone_request(tmp_path: Path) -> None:
    with serve_script("batched.py", tmp_path, env={"BATCH": "8", "BATCH_TIMEOUT": "0.05"}) as server:
        reply = httpx.post(f"{server.url}/predict", json={"input": 3}, timeout=30).json()
        assert reply == {"square": 9.0, "batch_size": 1}


def test_streaming_items_arrive_as_produced(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    writer: list[Any] = []

    def release_first_item() -> None:
        handle = open(gate, "wb", buffering=0)  # noqa: SIM115 - blocks until predict opens the FIFO
        handle.write(b"x")
        writer.append(handle)

    with serve_script("streaming.py", tmp_path) as server:
        opener = threading.Thread(target=release_first_item)
        opener.start()
        with requests.post(
            f"{server.url}/predict", json={"n": 3, "gate": str(gate)}, stream=True, timeout=30
        ) as response:
            opener.join(30)
            release = writer[0]
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = response.iter_lines()
            assert next(lines) == b'{"output": 0}'
            for i in range(1, 3):
                release.write(b"x")  # the server produces item i only after this byte
                assert next(lines) == f'{{"output": {i}}}'.encode()
            release.close()
            assert list(lines) == []


def test_streaming_disconnect_closes_the_generator(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with serve_script("streaming.py", tmp_path) as server:
        with requests.post(
            f"{server.url}/predict", json={"n": 10**9, "closed_marker": str(marker)}, stream=True, timeout=30
        ) as response:
            lines = response.iter_lines()
            assert next(lines) == b'{"output": 0}'
        # The worker notices the cancellation and closes predict's generator, which writes the marker.
        assert wait_for_text(marker) == "closed"
        # The worker is free again for the next request.
        assert httpx.post(f"{server.url}/predict", json={"n": 2}, timeout=10).text.splitlines() == [
            '{"output": 0}',
            '{"output": 1}',
        ]


def test_a_slow_client_holds_the_producer_back(tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    marker = tmp_path / "closed"
    # 64 KiB items: the socket buffers between front and client hold only a few dozen of them.
    request = {"n": 10_000, "pad": 65_536, "progress": str(progress), "closed_marker": str(marker)}
    with serve_script("streaming.py", tmp_path) as server:
        body = json.dumps(request).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
            # The client stops reading. Without flow control the worker would produce all 10,000
            # items (640 MiB) into the front's memory; with it, production stalls.
            waiter = threading.Event()
            previous, current = -1, 0
            for _ in range(40):  # bounded: until production has stalled
                waiter.wait(0.25)
                current = int(progress.read_text())
                if current == previous:
                    break
                previous = current
            assert current == previous
            assert current < 1_000
        assert wait_for_text(marker) == "closed"
