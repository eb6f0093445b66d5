"""Local replicas (``servekit serve MODEL --replicas N``): N ``servekit serve`` child processes, each on
its own 127.0.0.1 port, restarted when one dies. The proxy in front of them is the caller's."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from servekit.llm.config import EngineConfig
from servekit.settings import settings_of
from servekit.specs.llm.config import ServeConfig

logger = logging.getLogger(__name__)

MONITOR_S = 0.5
STOP_TIMEOUT_S = 40.0
# Settings each replica gets from its parent rather than from the command line.
_NOT_PASSED = frozenset(
    {"model", "host", "port", "replicas", "proxy_url", "proxy_api_key", "advertise_url", "api_key"}
    | {"ray_address", "num_cpus_per_replica", "num_gpus_per_replica"}
)
_PR_SET_PDEATHSIG = 1


def replica_flags(raw_flags: Mapping[str, Any]) -> list[str]:
    """The command line a replica runs with: the flags given to the parent (as given, so they parse
    the same), without those the parent answers for itself."""
    argv: list[str] = []
    model = raw_flags.get("model")
    if model is not None:
        argv.append(str(model))
    for config_class in (EngineConfig, ServeConfig):
        for s in settings_of(config_class):
            value = raw_flags.get(s.name)
            if value is None or s.name in _NOT_PASSED:
                continue
            if s.is_bool:
                argv.append(s.flag if value else "--no-" + s.flag[2:])
            else:
                argv += [s.flag, str(value)]
    return argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM when the parent dies, so a killed parent
    leaves no replica behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Replica:
    index: int
    port: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ReplicaSet:
    def __init__(self, count: int, flags: Sequence[str], api_key: str | None = None) -> None:
        self.flags = list(flags)
        self.env = {**os.environ, "SERVEKIT_REPLICAS": "1"}
        if api_key:
            self.env["SERVEKIT_API_KEY"] = api_key  # not on the command line, where ps would show it
        self.replicas = [Replica(index, _free_port()) for index in range(count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="servekit-replicas", daemon=True)

    @property
    def urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    def _spawn(self, replica: Replica) -> None:
        command = [sys.executable, "-m", "servekit.cli", "serve", *self.flags]
        command += ["--host", "127.0.0.1", "--port", str(replica.port), "--replicas", "1"]
        preexec = die_with_parent if sys.platform.startswith("linux") else None
        # Its own session: a Ctrl+C in the terminal reaches the parent, which stops the replicas itself
        # (a replica must not be seen dying of the same signal and restarted).
        replica.process = subprocess.Popen(command, env=self.env, start_new_session=True, preexec_fn=preexec)
        logger.info("replica %d: pid %d on %s", replica.index, replica.process.pid, replica.url)

    def start(self) -> None:
        with self._lock:
            for replica in self.replicas:
                self._spawn(replica)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_S):  # checking the children's exit status periodically
            with self._lock:
                if self._stop.is_set():
                    return
                for replica in self.replicas:
                    process = replica.process
                    if process is not None and process.poll() is not None:
                        logger.warning(
                            "replica %d (pid %d) exited with %s; restarting it",
                            replica.index,
                            process.pid,
                            process.returncode,
                        )
                        replica.restarts += 1
                        self._spawn(replica)

    def stop(self) -> None:
        """SIGTERM every replica (each finishes its requests), SIGKILL what is left after the grace."""
        self._stop.set()
        with self._lock:
            processes = [r.process for r in self.replicas if r.process is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if self._monitor.is_alive():
            self._monitor.join(5)
