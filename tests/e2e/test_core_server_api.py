"""The server's own routes and defaults over real HTTP: gzip, streams left uncompressed, the shutdown
API, LitServe's root, pretty logs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import serve_script

pytestmark = pytest.mark.timeout(180)

SHUTDOWN_KEY = "test-shutdown-key"


def test_large_responses_are_gzipped_and_streams_are_not(tmp_path: Path) -> None:
    with (
        serve_script("server_api.py", tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        big = client.post("/big", json={}, headers={"Accept-Encoding": "gzip"})
        assert big.headers["content-encoding"] == "gzip"
        assert 0 < int(big.headers["content-length"]) < 100000
        assert big.json() == {"result": "0" * 100000}
        plain = client.post("/big", json={}, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert int(plain.headers["content-length"]) > 100000
        small = client.post("/big", json={"size": 10}, headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in small.headers  # under LitServe's 1000-byte threshold
        assert client.get("/").text == "litserve running"

        # A stream is sent as it is produced, uncompressed: the second chunk is only produced
        # after the client has read the first one.
        marker = tmp_path / "got-first"
        request = {"marker": str(marker)}
        headers = {"Accept-Encoding": "gzip"}
        with client.stream("POST", "/stream", json=request, headers=headers) as reply:
            assert reply.status_code == 200
            assert "content-encoding" not in reply.headers
            lines = reply.iter_lines()
            assert next(lines) == '{"step": "first"}'
            marker.write_text("yes")
            assert [line for line in lines if line] == ['{"step": "after-marker"}']


@pytest.mark.parametrize("fronts", ["1", "2"])
def test_shutdown_api_needs_the_key_and_stops_the_server(tmp_path: Path, fronts: str) -> None:
    events = tmp_path / "events"
    env = {"LIT_SHUTDOWN_API_KEY": SHUTDOWN_KEY, "FRONTS": fronts, "EVENTS_FILE": str(events)}
    with serve_script("server_api.py", tmp_path, env=env) as server:
        url = f"{server.url}/shutdown"
        missing = httpx.post(url, timeout=30)
        assert missing.status_code == 401
        assert missing.json() == {"detail": "Not authenticated"}
        wrong = httpx.post(url, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert wrong.status_code == 401
        assert "Invalid Bearer token" in wrong.json()["detail"]
        assert server.process.poll() is None
        accepted = httpx.post(url, headers={"Authorization": f"Bearer {SHUTDOWN_KEY}"}, timeout=30)
        assert accepted.status_code == 200
        assert accepted.text == "Server is initiating graceful shutdown."
        assert server.process.wait(60) == 0  # run() returned: a graceful shutdown
    assert events.read_text() == "stop\nend\n"  # on_server_stop once, when the shutdown began


@pytest.mark.parametrize("fronts", ["1", "2"])
def test_sigterm_announces_the_stop_once(tmp_path: Path, fronts: str) -> None:
    events = tmp_path / "events"
    with serve_script(
        "server_api.py", tmp_path, env={"FRONTS": fronts, "EVENTS_FILE": str(events)}
    ) as server:
        assert not events.exists()
        assert server.stop() == 0
    assert events.read_text() == "stop\nend\n"


def test_shutdown_api_is_off_by_default_and_its_path_is_checked() -> None:
    import servekit as ls
    from tests.e2e.test_core_inprocess import SquareAPI

    assert not ls.LitServer(SquareAPI(), accelerator="cpu").enable_shutdown_api
    with pytest.raises(ValueError, match="shutdown_path must start with '/'"):
        ls.LitServer(SquareAPI(), accelerator="cpu", enable_shutdown_api=True, shutdown_path="stop")
    with pytest.raises(ValueError, match="already in use by the shutdown API"):
        ls.LitServer(SquareAPI(api_path="/shutdown"), accelerator="cpu", enable_shutdown_api=True)


def test_pretty_logs_render_through_rich(tmp_path: Path) -> None:
    env = {
        "PRETTY": "1",
        "SERVEKIT_LOG_LEVEL": "info",
        "LIT_SHUTDOWN_API_KEY": SHUTDOWN_KEY,
        "COLUMNS": "250",
    }
    with serve_script("server_api.py", tmp_path, env=env) as server:
        assert httpx.post(f"{server.url}/big", json={"size": 1}, timeout=30).status_code == 200
    log = server.log()
    # rich's layout: our format inside, the source file and line in its right-hand column.
    assert re.search(r"INFO\s+MainProcess servekit\.server \[-\]: servekit listening.*server\.py:\d+", log), (
        log
    )
