"""A server registering itself with a ``servekit proxy`` (``servekit serve --proxy-url``): once its own
``/health`` answers 200 it adds itself to the proxy's registry, again after the proxy restarts, and
it removes itself when its shutdown begins."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from servekit.callbacks import Callback

logger = logging.getLogger(__name__)

POLL_S = 0.2
MAX_BACKOFF_S = 5.0
HEARTBEAT_S = 5.0


def call_json(
    method: str, url: str, headers: dict[str, str], body: object = None, timeout: float = 5
) -> tuple[int, str]:
    """One blocking request (the standard library's client: this runs once, in its own thread); the status
    and the body text. Raises ``OSError`` (``URLError`` included) when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **headers}
    )
    try:
        # Straight to the server: HTTP(S)_PROXY variables are for the way out, not for this network.
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(request, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")


def advertised_url(host: str, port: int) -> str:
    """``http://HOST:PORT``; a wildcard address is replaced by this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class ProxyRegistration:
    """Registers ``node_url`` with the proxy once the node serves, registers it again whenever the
    proxy restarts without remembering it (a new ``proxy_id`` on its ``/health``), and removes it when
    the server begins shutting down (``on_server_stop``), so the proxy stops routing to it while its
    requests in flight complete."""

    def __init__(
        self,
        proxy_url: str,
        node_url: str,
        node_api_key: str | None = None,
        proxy_api_key: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.proxy_url = proxy_url.rstrip("/")
        self.node_url = node_url.rstrip("/")
        self.node_api_key = node_api_key
        self.proxy_headers = {"Authorization": f"Bearer {proxy_api_key}"} if proxy_api_key else {}
        self.heartbeat_s = heartbeat_s
        self.registered = threading.Event()
        self.registrations = 0  # how many times the proxy accepted this node
        self._proxy_id: str | None = None
        self._stop = threading.Event()
        self._deregistering = threading.Lock()
        self._deregistered = False
        self._thread = threading.Thread(target=self._run, name="servekit-proxy-registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop registering, and deregister if registered (once, however often it is called)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30)
        with self._deregistering:
            if self._deregistered or not self.registered.is_set():
                return
            self._deregistered = True
            try:
                status, _ = call_json(
                    "POST", f"{self.proxy_url}/nodes/remove", self.proxy_headers, {"url": self.node_url}
                )
                logger.info("deregistered from the proxy %s (%d)", self.proxy_url, status)
            except OSError as error:
                logger.warning("could not deregister from the proxy %s: %s", self.proxy_url, error)

    def _healthy(self) -> bool:
        headers = {"Authorization": f"Bearer {self.node_api_key}"} if self.node_api_key else {}
        try:
            return call_json("GET", f"{self.node_url}/health", headers, timeout=2)[0] == 200
        except OSError:
            return False

    def _run(self) -> None:
        while not self._healthy():
            if self._stop.wait(POLL_S):  # polling our own readiness until it serves or we stop
                return
        while not self._stop.is_set():
            self._register()
            while not self._stop.wait(self.heartbeat_s):  # the proxy's liveness, every heartbeat
                if self._proxy_restarted():
                    logger.info("the proxy %s restarted: registering again", self.proxy_url)
                    break

    def _register(self) -> None:
        backoff = POLL_S
        body: dict[str, object] = {"url": self.node_url}
        if self.node_api_key:
            body["api_key"] = self.node_api_key
        while not self._stop.is_set():
            try:
                status, text = call_json(
                    "POST", f"{self.proxy_url}/nodes/add", self.proxy_headers, body, timeout=30
                )
                if status == 200:
                    self._proxy_id = _proxy_id(text)
                    self.registrations += 1
                    self.registered.set()
                    logger.info("registered with the proxy %s as %s", self.proxy_url, self.node_url)
                    return
                logger.warning("the proxy %s refused the registration: %s", self.proxy_url, text)
            except OSError as error:
                logger.warning("cannot reach the proxy %s: %s", self.proxy_url, error)
            self._stop.wait(backoff)  # retrying an unreachable proxy, with backoff
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _proxy_restarted(self) -> bool:
        """Whether the proxy answering now is another process than the one that registered us. A proxy
        that cannot be reached has not (yet) restarted; one without an id (not servekit's) never has."""
        try:
            _, text = call_json("GET", f"{self.proxy_url}/health", self.proxy_headers, timeout=5)
        except OSError:
            return False
        current = _proxy_id(text)
        return current is not None and current != self._proxy_id


def _proxy_id(text: str) -> str | None:
    try:
        value = json.loads(text).get("proxy_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class DeregisterOnStop(Callback):
    """Leaves the proxy as soon as the server begins shutting down (in a thread: this hook must not
    block); ``registered_with`` waits for it to finish."""

    def __init__(self, registration: ProxyRegistration) -> None:
        self.registration: ProxyRegistration | None = registration

    def __getstate__(self) -> dict[str, Any]:
        return {"registration": None}  # the workers get the callbacks too: an inert copy

    def on_server_stop(self, *args: Any, **kwargs: Any) -> None:
        if self.registration is not None:
            threading.Thread(target=self.registration.stop, name="servekit-proxy-deregistration").start()


@contextlib.contextmanager
def registered_with(
    proxy_url: str,
    node_url: str,
    node_api_key: str | None,
    proxy_api_key: str | None,
    heartbeat_s: float = HEARTBEAT_S,
) -> Iterator[ProxyRegistration]:
    """Registered while the block runs; pass ``DeregisterOnStop(registration)`` to the server's
    callbacks to leave at the start of its shutdown rather than at its end."""
    registration = ProxyRegistration(proxy_url, node_url, node_api_key, proxy_api_key, heartbeat_s)
    registration.start()
    try:
        yield registration
    finally:
        registration.stop()
