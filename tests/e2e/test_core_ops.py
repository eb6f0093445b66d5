"""Operations on a core (LitServer) app: /metrics while a load runs, X-Request-ID in responses and
in every log line of the request, json logs, the access-log switch, and the browser's root."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serving import RunningServer, serve_script

pytestmark = pytest.mark.timeout(120)

LOAD = 12  # requests of the bounded load


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client: (name, sorted labels) -> value."""
    response = httpx.get(f"{url}/metrics", timeout=10, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)  # polling a server's state, bounded by the deadline
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"SERVEKIT_LOG_LEVEL": "info"}
    with serve_script("ops_core.py", tmp_path_factory.mktemp("ops"), env=env) as running:
        yield running


def test_metrics_move_under_load(server: RunningServer) -> None:
    before = scrape(server.url)
    route = {"route": "/predict", "method": "POST"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = pool.submit(
            httpx.post, f"{server.url}/predict", json={"input": "slow", "delay": 3}, timeout=30
        )
        # While the slow request runs: it is in flight and pending at a worker.
        wait_until(lambda: value(scrape(server.url), "servekit_queue_depth") >= 1)
        during = scrape(server.url)
        assert value(during, "servekit_http_requests_in_flight") >= 2  # the slow one and this scrape
        replies = list(
            pool.map(
                lambda i: httpx.post(f"{server.url}/predict", json={"input": i}, timeout=30), range(LOAD)
            )
        )
        assert [r.json() for r in replies] == [{"output": i} for i in range(LOAD)]
        assert slow.result().status_code == 200
    after = scrape(server.url)
    ok = {**route, "status": "200"}
    assert (
        value(after, "servekit_http_requests_total", **ok)
        - value(before, "servekit_http_requests_total", **ok)
        == LOAD + 1
    )
    count = "servekit_http_request_duration_seconds_count"
    assert value(after, count, route="/predict") - value(before, count, route="/predict") == LOAD + 1
    # The slow request landed in a bucket above 2.5 s, the others mostly below.
    slow_bucket = value(after, "servekit_http_request_duration_seconds_bucket", route="/predict", le="2.5")
    assert slow_bucket <= value(after, count, route="/predict") - 1
    assert value(after, "servekit_queue_depth") == 0
    assert value(after, "servekit_workers", state="ready") >= 1


def test_metrics_count_errors_and_unknown_routes(server: RunningServer) -> None:
    before = scrape(server.url)
    assert httpx.get(f"{server.url}/no/such/path/{time.time()}").status_code == 404
    assert httpx.post(f"{server.url}/predict", content=b"{not json").status_code in (400, 422)
    after = scrape(server.url)
    unmatched = value(after, "servekit_http_requests_total", route="unmatched", status="404")
    assert unmatched == value(before, "servekit_http_requests_total", route="unmatched", status="404") + 1
    assert not any("/no/such" in str(key) for key in after)  # raw paths never become labels


def test_worker_restart_is_counted(server: RunningServer) -> None:
    before = value(scrape(server.url), "servekit_worker_restarts_total")
    crashed = httpx.post(f"{server.url}/predict", json={"input": "x", "crash": True}, timeout=30)
    assert crashed.status_code == 503
    wait_until(lambda: value(scrape(server.url), "servekit_worker_restarts_total") == before + 1)
    wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, timeout=60)
    assert httpx.post(f"{server.url}/predict", json={"input": 1}, timeout=30).json() == {"output": 1}


def test_request_id_returned_and_logged(server: RunningServer) -> None:
    given = f"test-{time.time_ns()}"
    response = httpx.post(f"{server.url}/predict", json={"input": "tagged"}, headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given
    generated = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert httpx.get(f"{server.url}/health").headers["x-request-id"] != generated
    bad = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "x" * 500})
    assert bad.status_code == 400 and "X-Request-ID" in bad.json()["detail"]

    def tagged_lines() -> list[str]:
        return [line for line in server.log().splitlines() if given in line]

    # The worker's own line (predict) and the front's access-log line both carry the id.
    wait_until(lambda: len(tagged_lines()) >= 2)
    lines = tagged_lines()
    assert any("predicting tagged" in line for line in lines)
    assert any('"POST /predict" 200' in line for line in lines)


def test_root_sends_browsers_to_docs(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/").text == "litserve running"
    browser = httpx.get(f"{server.url}/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.status_code == 307 and browser.headers["location"] == "/docs"


@pytest.mark.parametrize("access_log", ["1", "0"])
def test_json_logs_and_access_log_switch(tmp_path: Path, access_log: str) -> None:
    env = {"SERVEKIT_LOG_LEVEL": "info", "SERVEKIT_LOG_FORMAT": "json", "SERVEKIT_ACCESS_LOG": access_log}
    given = f"json-{time.time_ns()}"
    with serve_script("ops_core.py", tmp_path, env=env) as server:
        response = httpx.post(f"{server.url}/predict", json={"input": "j"}, headers={"X-Request-ID": given})
        assert response.status_code == 200

        def entries() -> list[dict[str, str]]:
            return [json.loads(line) for line in server.log().splitlines() if line.strip()]

        def access_lines() -> list[dict[str, str]]:
            return [e for e in entries() if e["logger"] == "servekit.access" and e["request_id"] == given]

        wait_until(lambda: any(e["message"] == "predicting j" for e in entries()))
        if access_log == "1":
            wait_until(lambda: bool(access_lines()))
        records = entries()  # every line parses as JSON
        predict = next(e for e in records if e["message"] == "predicting j")
        assert predict["request_id"] == given and predict["level"] == "warning"
        access = access_lines()
        if access_log == "1":
            assert len(access) == 1 and '"POST /predict" 200' in access[0]["message"]
        else:
            assert access == []


def test_batch_size_histogram(tmp_path: Path) -> None:
    with serve_script("ops_core.py", tmp_path, env={"OPS_BATCHED": "1"}) as server:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: httpx.post(f"{server.url}/predict", json={"input": i}, timeout=30), range(8)
                )
            )
        sizes = [r.json()["batch_size"] for r in replies]
        samples = scrape(server.url)
        assert value(samples, "servekit_request_batch_size_count") == 8
        assert value(samples, "servekit_request_batch_size_sum") == sum(sizes)
        assert value(samples, "servekit_request_batch_size_bucket", le="4.0") == 8
        singles = value(samples, "servekit_request_batch_size_bucket", le="1.0")
        assert singles == sizes.count(1)
