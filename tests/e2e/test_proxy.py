"""`servekit proxy` as a real process in front of fake nodes (Starlette apps in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.e2e.fake_node import FakeNode, running_node
from tests.e2e.proxying import admitted, proxy_process, wait_for
from tests.e2e.serving import RunningServer

pytestmark = pytest.mark.timeout(120)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def healthy_nodes(proxy: RunningServer, headers: dict[str, str] | None = None) -> int:
    return len(admitted(proxy.url, headers))


def test_routes_streams_and_request_ids(tmp_path: Path) -> None:
    with (
        running_node(FakeNode(stream_chunks=4)) as a,
        running_node(FakeNode(stream_chunks=4)) as b,
        proxy_process(
            tmp_path, "--no-state-file", "--routing-strategy", "round_robin", "--node", a.url, "--node", b.url
        ) as proxy,
    ):
        wait_for(lambda: healthy_nodes(proxy) == 2)
        served = set()
        for _ in range(4):
            reply = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert reply.status_code == 200
            assert len(reply.headers["x-request-id"]) == 32
            served.add(reply.json()["node"])
        assert served == {a.port, b.port}
        # the client's request id reaches the node and comes back
        reply = httpx.post(
            f"{proxy.url}/v1/completions",
            json={"model": "fake-model", "prompt": "x"},
            headers={"X-Request-Id": "abc-1"},
            timeout=10,
        )
        assert reply.headers["x-request-id"] == "abc-1"
        assert any(r["headers"].get("x-request-id") == "abc-1" for r in a.requests + b.requests)
        # one the nodes would refuse is refused here, in OpenAI's envelope, on every route
        forwarded = len(a.requests + b.requests)
        for method, path in (("POST", "/v1/completions"), ("POST", "/flush_cache"), ("GET", "/v1/models")):
            bad = httpx.request(
                method, f"{proxy.url}{path}", json={"model": "fake-model", "prompt": "x"},
                headers={"X-Request-Id": "has space"}, timeout=10,
            )  # fmt: skip
            assert bad.status_code == 400, (path, bad.text)
            assert bad.json()["error"]["param"] == "X-Request-ID"
        assert len(a.requests + b.requests) == forwarded
        # streams pass through byte for byte
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(stream.iter_raw())
        node = json.loads(raw.split(b"\n\n")[0][len(b"data: ") :])["node"]
        expected = (
            b"".join(b'data: {"node":%d,"index":%d}\n\n' % (node, i) for i in range(4)) + b"data: [DONE]\n\n"
        )
        assert raw == expected
        models = httpx.get(f"{proxy.url}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["fake-model"]
        assert httpx.get(f"{proxy.url}/v1/models/fake-model", timeout=5).status_code == 200
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5).text
        assert f'servekit_proxy:node_requests_total{{node="{a.url}"}}' in metrics
        assert "servekit_proxy:node_request_latency_seconds_bucket" in metrics


def test_errors_in_openai_envelope(tmp_path: Path) -> None:
    with running_node(FakeNode()) as a, proxy_process(tmp_path, "--no-state-file", "--node", a.url) as proxy:
        wait_for(lambda: healthy_nodes(proxy) == 1)
        unknown = httpx.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "model": "other"}, timeout=5)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        bad = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{nope", timeout=5)
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        a.healthy = False
        wait_for(lambda: healthy_nodes(proxy) == 0)
        down = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=5)
        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert down.json()["error"]["code"] == "no_healthy_node"
        assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 503
        a.healthy = True  # re-admitted after two passed checks
        wait_for(lambda: healthy_nodes(proxy) == 1)
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=5).status_code == 200


def test_retries_503_and_dead_nodes_on_another_node(tmp_path: Path) -> None:
    with (
        running_node(FakeNode(overloaded=True)) as busy,
        running_node(FakeNode()) as good,
        proxy_process(
            tmp_path,
            "--no-state-file",
            "--routing-strategy",
            "round_robin",
            "--node",
            busy.url,
            "--node",
            good.url,
        ) as proxy,
    ):
        wait_for(lambda: healthy_nodes(proxy) == 2)
        for _ in range(4):
            reply = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert reply.status_code == 200
            assert reply.json()["node"] == good.port
        good.overloaded = True  # every node 503: the last node's own 503 reaches the client
        reply = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert reply.status_code == 503
        assert reply.json()["error"]["message"] == "overloaded"
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5).text
        assert f'servekit_proxy:node_retries_total{{node="{busy.url}"}}' in metrics


def test_stream_cut_after_first_byte_ends_with_error_event(tmp_path: Path) -> None:
    with (
        running_node(FakeNode(stream_chunks=5, break_after=2)) as a,
        proxy_process(tmp_path, "--no-state-file", "--node", a.url) as proxy,
    ):
        wait_for(lambda: healthy_nodes(proxy) == 1)
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        ) as stream:
            assert stream.status_code == 200
            events = [line[len("data: ") :] for line in stream.iter_lines() if line.startswith("data: ")]
        assert [json.loads(e)["index"] for e in events[:2]] == [0, 1]
        assert json.loads(events[2])["error"]["code"] == "node_failed"
        assert events[3:] == ["[DONE]"]


def test_client_disconnect_aborts_upstream_and_in_flight_returns_to_zero(tmp_path: Path) -> None:
    with (
        running_node(FakeNode(hold_stream=True)) as a,
        proxy_process(tmp_path, "--no-state-file", "--node", a.url) as proxy,
    ):
        wait_for(lambda: healthy_nodes(proxy) == 1)
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        ) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            status = httpx.get(f"{proxy.url}/nodes/status", timeout=5).json()
            assert status[a.url]["unfinished"] == 1
        assert a.disconnected.wait(10), "the node's stream was not cancelled"
        wait_for(lambda: httpx.get(f"{proxy.url}/nodes/status", timeout=5).json()[a.url]["unfinished"] == 0)


def test_registry_api_and_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with running_node(FakeNode(model="m1")) as a, running_node(FakeNode(model="m2", api_key="node-key")) as b:
        with proxy_process(tmp_path, "--state-file", str(state), "--api-key", "proxy-key") as proxy:
            auth = {"Authorization": "Bearer proxy-key"}
            assert httpx.get(f"{proxy.url}/nodes/status", timeout=5).status_code == 401
            assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 503  # open, no node
            added = httpx.post(f"{proxy.url}/nodes/add", json={"url": a.url}, headers=auth, timeout=10)
            assert added.status_code == 200 and added.json()["models"] == ["m1"]
            with_key = {"url": b.url + "/", "status": {"speed": 2}, "api_key": "node-key"}
            assert httpx.post(f"{proxy.url}/nodes/add", json=with_key, headers=auth, timeout=10).json()[
                "models"
            ] == ["m2"]
            unreachable = httpx.post(
                f"{proxy.url}/nodes/add", json={"url": "http://127.0.0.1:1"}, headers=auth, timeout=10
            )
            assert unreachable.status_code == 400
            assert (
                httpx.post(
                    f"{proxy.url}/nodes/add", json={"url": "ftp://x"}, headers=auth, timeout=5
                ).status_code
                == 400
            )
            reply = httpx.post(
                f"{proxy.url}/v1/chat/completions", json={**CHAT, "model": "m2"}, headers=auth, timeout=10
            )
            assert reply.status_code == 200 and reply.json()["node"] == b.port  # the node's key was sent
            assert "proxy-key" not in json.dumps(b.requests[-1]["headers"])
            models = httpx.get(f"{proxy.url}/v1/models", headers=auth, timeout=5).json()["data"]
            assert sorted(m["id"] for m in models) == ["m1", "m2"]
            flushed = httpx.post(f"{proxy.url}/flush_cache", headers=auth, timeout=10).json()
            assert flushed["flushed"] and sorted(n["body"]["node"] for n in flushed["nodes"]) == sorted(
                [a.port, b.port]
            )
            aborted = httpx.post(
                f"{proxy.url}/abort_request", json={"rid": f"rid-{b.port}"}, headers=auth, timeout=10
            )
            assert aborted.json()["aborted"] is True
            saved = json.loads(state.read_text())
            assert [n["url"] for n in saved["nodes"]] == [a.url, b.url]
            assert "unfinished" not in json.dumps(saved)
            assert (
                httpx.post(f"{proxy.url}/nodes/remove?node_url={a.url}", headers=auth, timeout=5).status_code
                == 200
            )
            assert (
                httpx.post(
                    f"{proxy.url}/nodes/remove", json={"url": a.url}, headers=auth, timeout=5
                ).status_code
                == 404
            )
            assert [n["url"] for n in json.loads(state.read_text())["nodes"]] == [b.url]
            # models given: nothing proved the node is up, its health checks admit it
            given = {"url": a.url, "status": {"models": ["m1"]}}
            assert (
                httpx.post(f"{proxy.url}/nodes/add", json=given, headers=auth, timeout=10).status_code == 200
            )
            wait_for(lambda: a.url in admitted(proxy.url, auth))
            httpx.post(f"{proxy.url}/nodes/remove", json={"url": a.url}, headers=auth, timeout=5)
        # reloaded at start: the node comes back, with its key, once its checks pass
        with proxy_process(tmp_path, "--state-file", str(state)) as proxy:
            wait_for(lambda: healthy_nodes(proxy) == 1)
            reply = httpx.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "model": "m2"}, timeout=10)
            assert reply.status_code == 200
            assert httpx.post(f"{proxy.url}/nodes/terminate", json={"url": b.url}, timeout=10).json()[
                "removed"
            ]
            assert httpx.get(f"{proxy.url}/nodes/status", timeout=5).json() == {}


def test_dead_node_is_retried_elsewhere_and_its_circuit_opens(tmp_path: Path) -> None:
    # Health checks a minute apart: only requests can find out that a node died.
    slow_checks = ["--health-check-interval", "60", "--circuit-breaker-failures", "2"]
    args = ["--no-state-file", "--routing-strategy", "round_robin", *slow_checks]
    with running_node(FakeNode()) as good, proxy_process(tmp_path, *args) as proxy:
        with running_node(FakeNode()) as doomed:
            for node in (good, doomed):
                assert (
                    httpx.post(f"{proxy.url}/nodes/add", json={"url": node.url}, timeout=10).status_code
                    == 200
                )
            assert len(admitted(proxy.url)) == 2
        for _ in range(6):
            reply = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10)
            assert reply.status_code == 200
            assert reply.json()["node"] == good.port
        assert admitted(proxy.url) == [good.url]
        status = httpx.get(f"{proxy.url}/nodes/status", timeout=5).json()
        assert status[doomed.url]["circuit"] == "open"
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5).text
        assert f'servekit_proxy:node_circuit_state{{node="{doomed.url}"}} 2.0' in metrics
        assert f'servekit_proxy:node_retries_total{{node="{doomed.url}"}} 2.0' in metrics


def test_sessions_stay_on_their_node(tmp_path: Path) -> None:
    with (
        running_node(FakeNode()) as a,
        running_node(FakeNode()) as b,
        running_node(FakeNode()) as c,
        proxy_process(
            tmp_path,
            "--no-state-file",
            "--routing-strategy",
            "session",
            "--node",
            a.url,
            "--node",
            b.url,
            "--node",
            c.url,
        ) as proxy,
    ):
        wait_for(lambda: healthy_nodes(proxy) == 3)

        def node_of(path: str, body: dict[str, object], headers: dict[str, str] | None = None) -> int:
            reply = httpx.post(f"{proxy.url}{path}", json=body, headers=headers, timeout=10)
            assert reply.status_code == 200
            return int(reply.json()["node"])

        for session in ("alpha", "beta", "gamma"):
            by_header = {node_of("/v1/chat/completions", CHAT, {"X-Session-Id": session}) for _ in range(5)}
            by_user = {node_of("/v1/chat/completions", {**CHAT, "user": session}) for _ in range(5)}
            assert len(by_header) == 1 and by_header == by_user
            interactive = {"prompt": "hi", "session_id": session, "interactive_mode": True}
            assert len({node_of("/v1/chat/interactive", interactive) for _ in range(5)}) == 1
