"""Helpers of the proxy tests: a `servekit proxy` process, and polling its public state."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.e2e.serving import RunningServer, serve_script

FAST_CHECKS = ["--health-check-interval", "0.1", "--health-check-timeout", "0.5"]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        time.sleep(0.05)  # polling a server's public state, bounded
    raise AssertionError("condition not met in time")


def admitted(proxy_url: str, headers: dict[str, str] | None = None) -> list[str]:
    """The nodes the proxy would send a request to now."""
    status = httpx.get(f"{proxy_url}/nodes/status", headers=headers, timeout=5).json()
    return [url for url, node in status.items() if node["admits_requests"]]


@contextlib.contextmanager
def proxy_process(tmp_path: Path, *args: str) -> Iterator[RunningServer]:
    with serve_script("proxy.py", tmp_path, args=[*FAST_CHECKS, *args], wait=False) as proxy:
        wait_for(lambda: httpx.get(f"{proxy.url}/metrics", timeout=2).status_code in (200, 401))
        yield proxy
