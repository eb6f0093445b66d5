"""Replicas as Ray actors (``servekit serve MODEL --ray-address ADDRESS --replicas N``): Ray core places
each replica on some node of the cluster; the replica serves HTTP there (a ``servekit serve`` process on
the node's address) and is registered with the proxy in front. Ray restarts a replica that dies (its
server dying takes the actor with it); the new one registers again, the old address is removed, and
while a replica is unavailable it is out of rotation, never the proxy down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from servekit.proxy.registration import call_json
from servekit.proxy.replicas import die_with_parent

logger = logging.getLogger(__name__)

WATCH_S = 1.0
STOP_TIMEOUT_S = 40.0


class RayResourcesError(RuntimeError):
    """The cluster cannot hold the replicas asked for (Ray itself would wait forever)."""


class ServeReplica:
    """The actor: one ``servekit serve`` on the node Ray placed it on. Wrapped with ``ray.remote`` when
    the replicas are created, not at import."""

    def __init__(self, flags: Sequence[str], env: dict[str, str]) -> None:
        import ray

        self.host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((self.host, 0))
            self.port = int(sock.getsockname()[1])
        command = [sys.executable, "-m", "servekit.cli", "serve", *flags]
        command += ["--host", self.host, "--port", str(self.port), "--replicas", "1"]
        self._stopping = threading.Event()
        self.process = subprocess.Popen(command, env={**os.environ, **env}, preexec_fn=die_with_parent)
        threading.Thread(target=self._exit_with_server, daemon=True).start()

    def _exit_with_server(self) -> None:
        code = self.process.wait()
        if self._stopping.is_set():
            return
        logger.error(
            "the replica's server (pid %d) exited with %s: the actor goes too", self.process.pid, code
        )
        os._exit(1)  # Ray restarts the actor, which starts a new server

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def server_pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        self._stopping.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def check_resources(total: dict[str, float], count: int, num_cpus: float, num_gpus: float) -> None:
    """Refuse at start what the cluster cannot place."""
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if count * num_cpus > cpus or count * num_gpus > gpus:
        raise RayResourcesError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; {count} replicas x ({num_cpus:g} CPU, "
            f"{num_gpus:g} GPU) need {count * num_cpus:g} CPUs and {count * num_gpus:g} GPUs: lower "
            "--replicas or --num-cpus/gpus-per-replica, or add nodes to the cluster"
        )


class RayReplicaSet:
    def __init__(
        self,
        address: str,
        count: int,
        flags: Sequence[str],
        proxy_url: str,
        api_key: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        self.address = address
        self.count = count
        self.flags = list(flags)
        self.proxy_url = proxy_url
        self.api_key = api_key
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.actors: list[Any] = []
        self.registered: dict[int, str] = {}
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="servekit-ray-replicas", daemon=True)

    def start(self) -> None:
        import ray

        ray.init(address=self.address, log_to_driver=False)
        try:
            check_resources(ray.cluster_resources(), self.count, self.num_cpus, self.num_gpus)
        except RayResourcesError:
            ray.shutdown()
            raise
        env = {"SERVEKIT_REPLICAS": "1"}
        if self.api_key:
            env["SERVEKIT_API_KEY"] = self.api_key
        actor = ray.remote(ServeReplica).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=-1, max_task_retries=0
        )
        self.actors = [actor.remote(self.flags, env) for _ in range(self.count)]
        self._monitor.start()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _current_url(self, actor: Any) -> str | None:
        """The actor's server URL once it serves; None while it is starting, restarting or gone."""
        import ray

        try:
            url = str(ray.get(actor.url.remote(), timeout=10))
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError,
        ):
            return None
        try:
            return url if call_json("GET", f"{url}/health", self._headers(), timeout=2)[0] == 200 else None
        except OSError:
            return None

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):  # the actors' state, polled; registration follows it
            for index, actor in enumerate(self.actors):
                url, old = self._current_url(actor), self.registered.get(index)
                if url == old or self._stop.is_set():
                    continue
                with contextlib.suppress(OSError):
                    if old is not None:
                        call_json("POST", f"{self.proxy_url}/nodes/remove", self._headers(), {"url": old})
                        del self.registered[index]
                        logger.warning("replica %d at %s is out of rotation", index, old)
                    if url is not None:
                        body = {"url": url, **({"api_key": self.api_key} if self.api_key else {})}
                        status, _ = call_json(
                            "POST", f"{self.proxy_url}/nodes/add", self._headers(), body, timeout=30
                        )
                        if status == 200:
                            self.registered[index] = url
                            logger.info("replica %d serves at %s", index, url)

    def server_pids(self) -> list[int]:
        import ray

        return [int(pid) for pid in ray.get([a.server_pid.remote() for a in self.actors], timeout=30)]

    def stop(self) -> None:
        import ray

        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(30)
        for actor in self.actors:
            with contextlib.suppress(Exception):  # an actor already gone has nothing to stop
                ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT_S + 15)
            ray.kill(actor, no_restart=True)
        ray.shutdown()
