"""The continuous (async) worker loop: concurrency inside one worker, streaming, cancellation."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest
import requests

from tests.e2e.serving import serve_script, wait_for_text

pytestmark = pytest.mark.timeout(120)


def test_async_predict_serves_requests_concurrently_in_one_worker(tmp_path: Path) -> None:
    with serve_script("async_api.py", tmp_path) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda _: httpx.post(f"{server.url}/predict", json={"expect": 4}, timeout=30).json(), range(4)
            )
        )
    assert all(reply["peak"] == 4 for reply in replies)


def test_async_stream_and_disconnect(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with serve_script("async_api.py", tmp_path, args=["stream"]) as server:
        lines = httpx.post(f"{server.url}/predict", json={"n": 3}, timeout=30).text.splitlines()
        assert lines == ['{"output": 0}', '{"output": 1}', '{"output": 2}']
        with requests.post(
            f"{server.url}/predict", json={"n": 10**9, "closed_marker": str(marker)}, stream=True, timeout=30
        ) as response:
            assert next(response.iter_lines()) == b'{"output": 0}'
        assert wait_for_text(marker) == "closed"
