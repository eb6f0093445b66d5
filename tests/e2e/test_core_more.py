"""Form uploads, loggers, several HTTP fronts, the ready-made examples, the generated client."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(120)


def test_multipart_upload_and_loggers(tmp_path: Path) -> None:
    log_file = tmp_path / "log.txt"
    with serve_script("more.py", tmp_path, args=["upload"], env={"LOG_FILE": str(log_file)}) as server:
        reply = httpx.post(
            f"{server.url}/predict",
            files={"file": ("a.bin", b"\x00" * 1234)},
            data={"label": "cat"},
            timeout=30,
        )
        assert reply.status_code == 200
        assert reply.json() == {"name": "a.bin", "size": 1234, "label": "cat"}
        waiter = threading.Event()
        for _ in range(200):  # the logger thread writes asynchronously
            if log_file.exists() and log_file.read_text():
                break
            waiter.wait(0.025)
    assert log_file.read_text() == "upload_size=1234\n"


def test_several_api_servers_share_the_port(tmp_path: Path) -> None:
    with serve_script("more.py", tmp_path, args=["fronts"]) as server:
        with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(lambda i: client.post(f"{server.url}/predict", json={"input": i}).json(), range(100))
            )
        assert [r["output"] for r in results] == [i * i for i in range(100)]


def test_ready_made_examples_and_generated_client(tmp_path: Path) -> None:
    with serve_script("more.py", tmp_path, args=["examples"]) as server:
        assert httpx.post(f"{server.url}/simple", json={"input": 4.0}).json() == {"output": 16.0}
        assert httpx.post(f"{server.url}/batched", json={"input": 3.0}).json() == {"output": 9.0}
        lines = httpx.post(f"{server.url}/stream", json={"input": "hi"}).text.splitlines()
        assert lines == ['{"output": "0: hi"}', '{"output": "1: hi"}', '{"output": "2: hi"}']
        assert isinstance(httpx.post(f"{server.url}/torch", json={"input": 1.0}).json()["output"], float)
        client_file = tmp_path / "client.py"
        assert client_file.exists()
        result = subprocess.run(
            [sys.executable, str(client_file)],
            env={**os.environ, "SERVEKIT_URL": server.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        # The generated client targets the first API's path (/simple) and prints its reply.
        assert "Status: 200" in result.stdout
        assert '{"output":16.0}' in result.stdout
