"""Timeouts, crashes, shutdown, auth, validation, context, callbacks, middlewares — over real HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import APPS, REPO, serve_script, wait_healthy

pytestmark = pytest.mark.timeout(180)


def test_timeout_gives_504_for_running_and_queued_requests(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["slow"], env={"TIMEOUT": "1"}) as server:
        url = f"{server.url}/predict"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # One of the two runs past the timeout; the other waits in the queue behind it.
            first = pool.submit(httpx.post, url, json={"seconds": 3}, timeout=30)
            second = pool.submit(httpx.post, url, json={"seconds": 3}, timeout=30)
            assert first.result().status_code == 504
            assert second.result().status_code == 504
            assert first.result().json() == {"detail": "Request timed out"}
        # The queued request was dropped without running: the first call to succeed once the worker
        # is free (earlier attempts time out in the queue, and are dropped too) is its second run.
        for _ in range(10):
            reply = httpx.post(url, json={"seconds": 0}, timeout=30)
            if reply.status_code != 504:
                break
        assert reply.status_code == 200
        assert reply.json()["calls"] == 2


def test_queued_request_of_a_disconnected_client_never_runs(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with serve_script("features.py", tmp_path, args=["slow"]) as server:
        url = f"{server.url}/predict"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                httpx.post, url, json={"seconds": 2, "started_marker": str(started)}, timeout=30
            )
            waiter = threading.Event()
            for _ in range(400):  # bounded: until the first request occupies the worker
                if started.exists():
                    break
                waiter.wait(0.025)
            # The second client gives up while its request waits behind the first one.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json={"seconds": 0, "tag": "gone"}, timeout=0.5)
            assert running.result().json()["calls"] == 1
        # The abandoned request was removed from the queue: the next request is the worker's second run.
        assert httpx.post(url, json={}, timeout=30).json()["calls"] == 2


def test_http_exception_and_predict_error(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["slow"]) as server:
        teapot = httpx.post(f"{server.url}/predict", json={"http_error": True}, timeout=30)
        assert teapot.status_code == 418
        assert teapot.json() == {"detail": "teapot"}
        failed = httpx.post(f"{server.url}/predict", json={"fail": True}, timeout=30)
        assert failed.status_code == 500
        # An unexpected exception's message stays in the server's log, out of the client's body.
        assert failed.json() == {"detail": "Internal server error"}
    assert "ValueError: predict failed on purpose" in server.log()
    assert "Traceback" in server.log()


def test_debug_errors_show_the_exception_in_500_bodies(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["slow"], env={"SERVEKIT_DEBUG_ERRORS": "1"}) as server:
        failed = httpx.post(f"{server.url}/predict", json={"fail": True}, timeout=30)
        assert failed.status_code == 500
        assert failed.json() == {"detail": "ValueError: predict failed on purpose"}
    assert "Traceback" in server.log()  # logged either way


def test_crashed_worker_fails_in_flight_with_503_and_restarts(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["slow"]) as server:
        first_pid = httpx.post(f"{server.url}/predict", json={}, timeout=30).json()["pid"]
        crashed = httpx.post(f"{server.url}/predict", json={"crash": True}, timeout=30)
        assert crashed.status_code == 503
        assert "crashed" in crashed.json()["detail"]
        wait_healthy(server.url, server.process, 60)
        reply = httpx.post(f"{server.url}/predict", json={}, timeout=30).json()
        assert reply["pid"] != first_pid
        assert reply["calls"] == 1


def test_setup_failure_stops_the_server_with_the_error(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    env["PORT"] = str(__import__("tests.e2e.serving", fromlist=["free_port"]).free_port())
    result = subprocess.run(
        [sys.executable, str(APPS / "features.py"), "setup_fails"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode != 0
    assert "the model file is missing (on purpose)" in result.stderr


def test_sigterm_finishes_in_flight_requests_and_leaves_nothing_behind(tmp_path: Path) -> None:
    socket_dir = tmp_path / "tmp"
    socket_dir.mkdir()
    started = tmp_path / "started"
    with serve_script("features.py", tmp_path, args=["slow"], env={"TMPDIR": str(socket_dir)}) as server:
        children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True)
        child_pids = [int(p) for p in children.stdout.split()]
        assert child_pids
        assert any(socket_dir.iterdir())  # the transport's socket directory exists while serving
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                httpx.post,
                f"{server.url}/predict",
                json={"seconds": 1.5, "started_marker": str(started)},
                timeout=30,
            )
            waiter = threading.Event()
            for _ in range(400):  # bounded: until predict has started
                if started.exists() or future.done():
                    break
                waiter.wait(0.025)
            assert started.exists()
            server.process.send_signal(signal.SIGTERM)
            assert future.result().status_code == 200
        assert server.process.wait(30) == 0
    for pid in child_pids:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()
    assert list(socket_dir.iterdir()) == []


def test_sigterm_leaves_no_process_in_the_group(tmp_path: Path) -> None:
    """The server returns only after every process it started has exited (CI once saw the
    resource tracker outlive it): nothing is left in its process group when it has exited."""
    for _ in range(3):
        with serve_script("hello_cli.py", tmp_path) as server:
            assert httpx.post(f"{server.url}/predict", json={"input": 4.0}).json() == {"output": 16.0}
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0
            group = subprocess.run(["pgrep", "-g", str(server.process.pid)], capture_output=True, text=True)
            assert group.stdout.split() == []


def test_api_key_auth(tmp_path: Path) -> None:
    key = "s3cret-key"
    with serve_script(
        "hello.py", tmp_path, env={"LIT_SERVER_API_KEY": key}, health_headers={"X-API-Key": key}
    ) as server:
        url = f"{server.url}/predict"
        assert httpx.post(url, json={"input": 2.0}).status_code == 401
        assert httpx.post(url, json={"input": 2.0}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.post(url, json={"input": 2.0}, headers={"X-API-Key": key}).json() == {"output": 4.0}
        bearer = httpx.post(url, json={"input": 2.0}, headers={"Authorization": f"Bearer {key}"})
        assert bearer.json() == {"output": 4.0}
        assert httpx.get(f"{server.url}/docs").status_code == 200


def test_custom_authorize_hook(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["authorize"]) as server:
        url = f"{server.url}/predict"
        denied = httpx.post(url, json={}, headers={"x-team": "red"})
        assert denied.status_code == 403
        assert denied.json() == {"detail": "team blue only"}
        assert httpx.post(url, json={}, headers={"x-team": "blue"}).json() == {"ok": True}


def test_pydantic_request_and_response_models(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["typed"]) as server:
        url = f"{server.url}/predict"
        assert httpx.post(url, json={"name": "Ada", "age": 36}).json() == {"greeting": "Hello Ada, 36"}
        bad = httpx.post(url, json={"name": "Ada", "age": "old"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "age"]
        missing = httpx.post(url, json={"age": 3})
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["body", "name"]


def test_context_is_shared_across_hooks(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["context"]) as server:
        reply = httpx.post(f"{server.url}/predict", json={"input": 21}).json()
        assert reply == {"output": 42, "seen": ["decode", "predict", "encode"], "input": 21}


def test_callbacks_and_middlewares(tmp_path: Path) -> None:
    marker = tmp_path / "events.txt"
    with serve_script("features.py", tmp_path, args=["callbacks"], env={"MARKER": str(marker)}) as server:
        response = httpx.post(f"{server.url}/predict", json={})
        assert response.status_code == 200
        assert response.headers["X-Servekit-Test"] == "yes"
    events = marker.read_text().splitlines()
    assert events[0] == "server_start"
    assert "after_setup" in events
    assert events[-2:] == ["before_predict", "after_predict"]


def test_several_apis_on_one_server(tmp_path: Path) -> None:
    with serve_script("features.py", tmp_path, args=["multi"]) as server:
        assert httpx.post(f"{server.url}/context", json={"input": 1}).json()["output"] == 2
        assert httpx.post(f"{server.url}/slow", json={}).json()["calls"] == 1
        assert httpx.post(f"{server.url}/predict", json={}).status_code == 404
