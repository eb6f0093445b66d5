"""`servekit client URL` driven under a pseudo-terminal: it streams replies, keeps history, /reset, /exit."""

from __future__ import annotations

import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_client import MODEL, FakeServer

SRC = Path(__file__).resolve().parents[2] / "src"


class TerminalSession:
    """A command on a pty: ``expect`` reads its screen output until a pattern shows (bounded in time)."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.output = ""
        self.position = 0  # where the last match ended: the next expect searches from there

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.output, self.position)
            if match:
                self.position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.output}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"{pattern!r} not seen before exit; output:\n{self.output}")
                self.output += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def send_line(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\n")

    def send_eof(self) -> None:
        os.write(self.master, b"\x04")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(api_key="k")
    yield server
    server.close()


def client_command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "servekit.cli", "client", url, *extra]


def test_terminal_chat_streams_keeps_history_and_resets(fake_server: FakeServer) -> None:
    session = TerminalSession(client_command(fake_server.url, "--api-key", "k", "--system", "Be brief."))
    try:
        session.expect(f"Chatting with {MODEL}")
        session.expect(">>> ")
        session.send_line("hello")
        # system + user: two messages reached the server
        session.expect(r"\[2\] you said: hello\n")
        session.expect(">>> ")
        session.send_line("and again")
        session.expect(r"\[4\] you said: and again\n")  # system, user, assistant, user
        assert [m["role"] for m in fake_server.seen[-1]["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
        ]
        assert fake_server.seen[-1]["messages"][2]["content"] == "[2] you said: hello"
        assert fake_server.seen[-1]["stream"] is True
        session.expect(">>> ")
        session.send_line("/reset")
        session.expect(r"conversation cleared")
        session.send_line("fresh")
        session.expect(r"\[2\] you said: fresh\n")
        session.expect(">>> ")
        session.send_line("/exit")
        assert session.wait() == 0
    finally:
        session.kill()


def test_terminal_chat_quits_on_ctrl_d(fake_server: FakeServer) -> None:
    session = TerminalSession(client_command(fake_server.url, "--api-key", "k"))
    try:
        session.expect(">>> ")
        session.send_eof()
        assert session.wait() == 0
    finally:
        session.kill()


def test_terminal_chat_reports_an_unreachable_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = TerminalSession(client_command(f"http://127.0.0.1:{port}"))
    try:
        session.expect(r"error: cannot reach the server at http://127\.0\.0\.1:\d+")
        assert session.wait() == 1
    finally:
        session.kill()


def test_terminal_chat_reports_a_wrong_api_key(fake_server: FakeServer) -> None:
    session = TerminalSession(client_command(fake_server.url, "--api-key", "wrong"))
    try:
        session.expect(r"error: HTTP 401: invalid API key")
        assert session.wait() == 1
    finally:
        session.kill()
