"""A server registering itself with a ``servekit proxy`` (``servekit serve --proxy-url``): once its own
``/health`` answers 200 it adds itself to the proxy's registry, and it removes itself on shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

logger = logging.getLogger(__name__)

POLL_S = 0.2
MAX_BACKOFF_S = 5.0


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
    def __init__(
        self,
        proxy_url: str,
        node_url: str,
        node_api_key: str | None = None,
        proxy_api_key: str | None = None,
    ) -> None:
        self.proxy_url = proxy_url.rstrip("/")
        self.node_url = node_url.rstrip("/")
        self.node_api_key = node_api_key
        self.proxy_headers = {"Authorization": f"Bearer {proxy_api_key}"} if proxy_api_key else {}
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._register, name="servekit-proxy-registration", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop trying to register, and deregister if registered."""
        self._stop.set()
        self._thread.join(30)
        if not self.registered.is_set():
            return
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

    def _register(self) -> None:
        while not self._healthy():
            if self._stop.wait(POLL_S):  # polling our own readiness until it serves or we stop
                return
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
                    self.registered.set()
                    logger.info("registered with the proxy %s as %s", self.proxy_url, self.node_url)
                    return
                logger.warning("the proxy %s refused the registration: %s", self.proxy_url, text)
            except OSError as error:
                logger.warning("cannot reach the proxy %s: %s", self.proxy_url, error)
            self._stop.wait(backoff)  # retrying an unreachable proxy, with backoff
            backoff = min(backoff * 2, MAX_BACKOFF_S)


@contextlib.contextmanager
def registered_with(
    proxy_url: str, node_url: str, node_api_key: str | None, proxy_api_key: str | None
) -> Iterator[ProxyRegistration]:
    registration = ProxyRegistration(proxy_url, node_url, node_api_key, proxy_api_key)
    registration.start()
    try:
        yield registration
    finally:
        registration.stop()
