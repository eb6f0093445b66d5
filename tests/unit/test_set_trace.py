"""ls.set_trace: a pdb session in a spawned worker-like process, driven over its terminal (a pty)."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import servekit as ls

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

# A main process that spawns a child as servekit spawns its workers (stdin is /dev/null there);
# the child stops at ls.set_trace() with a local variable to inspect.
SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import sys

    import servekit as ls


    def worker() -> None:
        assert sys.stdin.read() == "", "a spawned process reads /dev/null on stdin"
        secret = 6 * 7
        ls.set_trace()
        print("after the breakpoint", secret + 1, flush=True)


    if __name__ == "__main__":
        process = multiprocessing.get_context("spawn").Process(target=worker)
        process.start()
        process.join(60)
        sys.exit(process.exitcode)
    """
)


class Terminal:
    """The master side of a pty: read until some text shows up (bounded), type lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = ""

    def expect(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not seen on the terminal; it shows:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the other side closed
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {text!r}; it shows:\n{self.seen}")
                self.seen += data.decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")


def test_set_trace_debugs_a_spawned_process_on_the_terminal(tmp_path: Path) -> None:
    script = tmp_path / "debug_me.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("SERVEKIT_DEBUG_TTY", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.execve(sys.executable, [sys.executable, str(script)], env)
    terminal = Terminal(fd)
    try:
        terminal.expect("(Pdb) ")
        terminal.type("p secret")
        terminal.expect("42")
        terminal.type("c")
        terminal.expect("after the breakpoint 43")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_set_trace_without_a_terminal_warns_and_carries_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SERVEKIT_DEBUG_TTY", str(tmp_path / "no-such-terminal"))
    ls.set_trace()
    assert "no terminal to debug on" in caplog.text
    monkeypatch.setenv("LITSERVE_DEBUG", "0")
    ls.set_trace_if_debug()  # not set to 1: no breakpoint, no warning
    assert caplog.text.count("no terminal") == 1
