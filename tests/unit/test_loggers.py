"""Loggers in the main process: pairs sent from a worker's thread arrive in order; ``mount`` collects
the apps the server serves."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

import servekit as ls
from servekit.examples import SimpleLitAPI
from servekit.loggers import LoggerHub, LogSender


class LockedLogger(ls.Logger):
    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()  # cannot be pickled: it never leaves the main process
        self.pairs: list[tuple[str, Any]] = []
        self.expected = expected
        self.done = threading.Event()

    def process(self, key: str, value: Any) -> None:
        with self.lock:
            self.pairs.append((key, value))
            if len(self.pairs) == self.expected:
                self.done.set()


class FailingLogger(ls.Logger):
    def process(self, key: str, value: Any) -> None:
        raise RuntimeError("broken logger")


def test_pairs_reach_every_logger_in_order(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path / 'log'}"
    sink = LockedLogger(expected=3)
    hub = LoggerHub([FailingLogger(), sink], address)
    hub.start()
    context: zmq.Context[Any] = zmq.Context()
    try:
        send = LogSender(context, address)
        send("a", 1)
        send("b", {"nested": [1, 2]})
        send("c", None)
        assert sink.done.wait(20)
        assert sink.pairs == [("a", 1), ("b", {"nested": [1, 2]}), ("c", None)]  # a failing logger is skipped
    finally:
        hub.stop()
        context.destroy(linger=0)  # the sender thread never closes its socket (a worker just exits)


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called here")


def test_mount_collects_paths_and_apps() -> None:
    sink = LockedLogger(expected=0)
    assert sink.mounts == []
    sink.mount("/metrics", _ok_app)
    assert sink.mounts == [("/metrics", _ok_app)]
    with pytest.raises(ValueError, match="must start with '/'"):
        sink.mount("metrics", _ok_app)
    server = ls.LitServer(SimpleLitAPI(), accelerator="cpu", loggers=[sink])
    assert server._logger_mounts() == [("/metrics", _ok_app)]


def test_an_unpicklable_mount_with_several_fronts_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sink = LockedLogger(expected=0)
    sink.mount("/metrics", lambda scope, receive, send: None)
    server = ls.LitServer(SimpleLitAPI(), accelerator="cpu", loggers=sink)
    with pytest.raises(ValueError, match="cannot be copied into the 2 HTTP front processes"):
        server.run(host="127.0.0.1", port=8000, num_api_servers=2)
