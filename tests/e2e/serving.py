"""Start a real server process for a test, wait for it to be healthy, stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return int(self.process.returncode)


def wait_healthy(
    url: str,
    process: subprocess.Popen[str],
    timeout: float,
    headers: dict[str, str] | None = None,
    path: str = "/health",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2, headers=headers).status_code == 200:
                return
        time.sleep(0.1)  # polling an external process's readiness, bounded by the deadline
    raise TimeoutError(f"server at {url} not healthy after {timeout}s")


def health_after_restart(url: str, timeout: float) -> list[int]:
    """Poll ``/health`` until it has answered 503 (a worker down) and then 200 again (restarted), or
    ``timeout`` passes; the statuses seen, in order."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
        if 503 in statuses and statuses[-1] == 200:
            break
        time.sleep(0.05)  # polling the server's public health route, bounded by the deadline
    return statuses


@contextlib.contextmanager
def serve_script(
    script: str | Path,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    wait: bool = True,
    health_headers: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Run ``script`` (a file in tests/e2e/apps or a path) with PORT set; yield once /health is 200."""
    path = Path(script) if os.path.isabs(str(script)) else APPS / script
    with serve_command(
        [sys.executable, str(path), *(args or [])],
        tmp_path,
        env=env,
        wait=wait,
        health_headers=health_headers,
    ) as server:
        yield server


@contextlib.contextmanager
def serve_command(
    command: list[str],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    wait: bool = True,
    health_headers: dict[str, str] | None = None,
    health_path: str = "/health",
    port: int | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Run ``command`` (``{port}`` in it is replaced by a free port, also in env PORT) in its own
    session; yield once ``health_path`` answers 200; stop it and everything it started afterwards."""
    port = free_port() if port is None else port
    full_env = {
        **os.environ,
        "PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "SERVEKIT_LOG_LEVEL": os.environ.get("SERVEKIT_TEST_LOG_LEVEL", "warning"),
        **(env or {}),
    }
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            cwd=tmp_path,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait:
            wait_healthy(server.url, process, startup_timeout, health_headers, health_path)
        yield server
    except BaseException:
        sys.stderr.write(server.log())
        raise
    finally:
        server.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of a failed test, if any


def wait_for_text(path: Path, attempts: int = 600, interval: float = 0.05) -> str:
    """A marker file's text once it has some (bounded: 30 s by default), else "".

    Apps open a marker, then write it: a file that merely exists may still be empty.
    """
    waiter = threading.Event()
    for _ in range(attempts):
        if path.exists() and path.read_text():
            break
        waiter.wait(interval)
    return path.read_text() if path.exists() else ""


def tiny_checkpoint(tmp_path_factory: Any) -> Path:
    """A tiny random Llama checkpoint (``tests.llm.tiny_models``) named tiny-llama, in a fresh tmp dir."""
    from tests.llm.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")
