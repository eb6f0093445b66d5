"""Testing an API in-process, without a port.

``LitServer.app`` is a real ASGI app: entering its lifespan (``with TestClient(server.app)``, or
asgi-lifespan's ``LifespanManager`` with httpx's ``ASGITransport``) starts the inference workers as
real processes and waits until they are ready; leaving it stops them and waits for them.
``wrap_litserve_start`` is LitServe's helper of the same name, for tests written against LitServe::

    from fastapi.testclient import TestClient
    from servekit.testing import wrap_litserve_start

    with wrap_litserve_start(server) as s, TestClient(s.app) as client:
        assert client.post("/predict", json={"input": 4.0}).json() == {"output": 16.0}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from servekit.server import LitServer


@contextlib.contextmanager
def wrap_litserve_start(server: LitServer, worker_monitor: bool = False) -> Iterator[LitServer]:
    """Yield ``server`` for in-process use of ``server.app``; on exit, make sure its workers are gone.

    The app's lifespan starts and stops the workers; this context only guarantees that nothing
    outlives it (a lifespan that was never ended). ``worker_monitor`` is accepted for LitServe
    compatibility: servekit always supervises its workers (a crashed worker fails its requests with
    503 and is restarted).
    """
    try:
        yield server
    finally:
        server._stop_workers()
