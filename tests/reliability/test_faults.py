"""`servekit serve` under faults: a SIGKILLed inference worker, a burst at 10x the queue limit, and
SIGTERM under load. (A killed replica behind the proxy: tests/e2e/test_proxy_serve.py.)"""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from tests.e2e.serving import RunningServer, serve_script, wait_healthy
from tests.reliability.storm import metrics, wait_until

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-llama"
RUNNING = f'servekit:num_requests_running{{model_name="{MODEL}"}}'
WAITING = f'servekit:num_requests_waiting{{model_name="{MODEL}"}}'
# Engine steps slowed down so that requests are still running when the test acts.
SLOW_ENV = {
    "SERVEKIT_NUM_THREADS": "1",
    "SERVEKIT_MAX_MODEL_LEN": "512",
    "SERVEKIT_TEST_ENGINE_STEP_DELAY_S": "0.02",
}
GENEROUS_S = 60.0


def worker_pid(server: RunningServer) -> int:
    workers = [
        child
        for child in psutil.Process(server.process.pid).children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    ]
    assert len(workers) == 1, workers
    return workers[0].pid


def stream_outcome(url: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat request to its end: status, the error event if any, [DONE], end time."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens}
    body.update(stream=True, ignore_eos=True)
    outcome: dict[str, Any] = {"status": None, "error": None, "done": False, "finish_reason": None}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=GENEROUS_S) as response:
        outcome["status"] = response.status_code
        if response.status_code != 200:
            response.read()
            outcome["error"] = response.json()["error"]
        for line in response.iter_lines():
            if line == "data: [DONE]":
                outcome["done"] = True
            elif line.startswith("data: "):
                event = orjson.loads(line[len("data: ") :])
                if "error" in event:
                    outcome["error"] = event["error"]
                elif event["choices"] and event["choices"][0].get("finish_reason"):
                    outcome["finish_reason"] = event["choices"][0]["finish_reason"]
    outcome["ended"] = time.monotonic()
    return outcome


class HealthWatch:
    """Samples /health in a thread while the block runs: (time, status or None when unreachable)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status: int | None = httpx.get(f"{self.url}/health", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            self.samples.append((time.monotonic(), status))
            self._stop.wait(0.05)  # the sampling period, not a synchronisation

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sigkill_worker_under_load(tiny_model: Path, tmp_path: Path) -> None:
    with serve_script("llm_serve.py", tmp_path, env=SLOW_ENV, args=[str(tiny_model)]) as server:
        victim = worker_pid(server)
        with concurrent.futures.ThreadPoolExecutor(6) as pool, HealthWatch(server.url) as health:
            futures = [pool.submit(stream_outcome, server.url, 400) for _ in range(6)]
            wait_until(lambda: metrics(server.url)[RUNNING] == 6, GENEROUS_S, "6 streams running")
            killed = time.monotonic()
            psutil.Process(victim).kill()
            outcomes = [f.result(timeout=GENEROUS_S) for f in futures]  # none hangs
            wait_healthy(server.url, server.process, 120)
            back = time.monotonic()
        for outcome in outcomes:
            assert outcome["status"] == 200 and outcome["done"], outcome  # a terminal answer each
            assert outcome["error"]["type"] == "service_unavailable", outcome
        failed_in = max(o["ended"] for o in outcomes) - killed
        print(
            f"in-flight streams failed {failed_in:.2f}s after the kill; healthy again after {back - killed:.1f}s"
        )
        after_kill = [status for at, status in health.samples if at > killed]
        assert 503 in after_kill  # /health told the truth while no worker was ready
        assert worker_pid(server) != victim
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=GENEROUS_S).status_code == 200


def test_overload_at_ten_times_the_queue_limit(tiny_model: Path, tmp_path: Path) -> None:
    env = {**SLOW_ENV, "SERVEKIT_MAX_QUEUED_REQUESTS": "4", "SERVEKIT_MAX_NUM_SEQS": "2"}
    with serve_script("llm_serve.py", tmp_path, env=env, args=[str(tiny_model)]) as server:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 16, "ignore_eos": True}

        def post() -> tuple[int, str | None, dict[str, Any], float]:
            started = time.monotonic()
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=GENEROUS_S)
            took = time.monotonic() - started
            return response.status_code, response.headers.get("retry-after"), response.json(), took

        with concurrent.futures.ThreadPoolExecutor(40) as pool, HealthWatch(server.url) as health:
            results = list(pool.map(lambda _: post(), range(40)))
        refused = [r for r in results if r[0] == 503]
        served = [r for r in results if r[0] == 200]
        assert len(refused) + len(served) == 40, [r[0] for r in results]
        assert refused and served
        for _, retry_after, answer, _ in refused:
            assert retry_after == "1" and answer["error"]["code"] == "overloaded"
        for _, _, answer, _ in served:
            assert answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == 16
        slowest_refusal = max(r[3] for r in refused)
        slowest_served = max(r[3] for r in served)
        print(
            f"{len(refused)} refused (slowest {slowest_refusal:.2f}s), {len(served)} served (slowest {slowest_served:.2f}s)"
        )
        assert all(status == 200 for _, status in health.samples)  # overloaded, but alive and ready
        wait_until(
            lambda: metrics(server.url)[WAITING] == 0 and metrics(server.url)[RUNNING] == 0, 30, "idle"
        )
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # recovered: a burst the queue holds
            assert [r[0] for r in pool.map(lambda _: post(), range(4))] == [200] * 4


def test_sigterm_under_load(tiny_model: Path, tmp_path: Path) -> None:
    socket_dir = tmp_path / "sockets"
    socket_dir.mkdir()
    env = {**SLOW_ENV, "TMPDIR": str(socket_dir)}
    with serve_script("llm_serve.py", tmp_path, env=env, args=[str(tiny_model)]) as server:
        group = server.process.pid
        assert any(socket_dir.iterdir())  # the transport's sockets, while serving
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stream_outcome, server.url, 60) for _ in range(3)]
            wait_until(lambda: metrics(server.url)[RUNNING] == 3, GENEROUS_S, "3 streams running")
            signalled = time.monotonic()
            server.process.terminate()
            wait_until(lambda: refused(server.url), 30, "new connections refused")
            outcomes = [f.result(timeout=GENEROUS_S) for f in futures]
        assert server.process.wait(30) == 0
        exited = time.monotonic()
        for outcome in outcomes:  # in-flight requests completed
            assert outcome["status"] == 200 and outcome["done"] and outcome["error"] is None, outcome
            assert outcome["finish_reason"] == "length", outcome  # all of its 60 tokens
        print(f"exited {exited - signalled:.2f}s after SIGTERM")
        leftovers = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True)
        assert leftovers.stdout.split() == []
        assert list(socket_dir.iterdir()) == []


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False
