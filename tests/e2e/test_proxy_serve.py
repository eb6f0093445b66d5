"""`servekit proxy` in front of real `servekit serve` nodes (a tiny random model), with the `openai`
client: registration with --proxy-url, streams, disconnects; then `servekit serve --replicas`."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.proxying import FAST_CHECKS, admitted, proxy_process, wait_for
from tests.e2e.serving import APPS, RunningServer, free_port, serve_command, serve_script
from tests.e2e.test_serve_tiny import MESSAGES, SERVER_ENV, metrics, tiny_model

pytestmark = pytest.mark.timeout(600)

__all__ = ["tiny_model"]  # the fixture, shared with test_serve_tiny

KV_TOTAL = 'servekit:num_kv_blocks{model_name="tiny-llama"}'
KV_FREE = 'servekit:num_free_kv_blocks{model_name="tiny-llama"}'
RUNNING = 'servekit:num_requests_running{model_name="tiny-llama"}'


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def node(
    tiny_model: Path, tmp_path: Path, proxy_url: str, *args: str, headers: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    with serve_script(
        "llm_serve.py",
        tmp_path,
        env=SERVER_ENV,
        args=[str(tiny_model), "--proxy-url", proxy_url, *args],
        health_headers=headers,
    ) as running:
        yield running


def registered(proxy_url: str) -> list[str]:
    return list(httpx.get(f"{proxy_url}/nodes/status", timeout=5).json())


def test_a_node_leaves_the_proxy_when_its_shutdown_begins(tiny_model: Path, tmp_path: Path) -> None:
    """Deregistered at SIGTERM, before its stream in flight ends (which still completes)."""
    with (
        proxy_process(tmp_path, "--no-state-file") as proxy,
        node(tiny_model, tmp_path, proxy.url) as server,
    ):
        wait_for(lambda: admitted(proxy.url) == [server.url], timeout=30)
        body = {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": 1500,
            "stream": True,
            "ignore_eos": True,
        }
        events: list[str] = []
        gone_mid_stream: list[bool] = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events.append(next(lines))
            server.process.send_signal(signal.SIGTERM)
            for line in lines:
                events.append(line)
                if not gone_mid_stream and server.url not in registered(proxy.url):
                    gone_mid_stream.append(events[-1] != "data: [DONE]")
        assert gone_mid_stream == [True], "deregistered only after the stream ended (or never)"
        assert events[-1] == "data: [DONE]" and "error" not in events[-2]
        assert server.process.wait(120) == 0


def test_nodes_register_again_after_the_proxy_restarts_without_state(
    tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    command = [sys.executable, str(APPS / "proxy.py"), *FAST_CHECKS, "--no-state-file"]
    with (
        serve_command(command, tmp_path, port=port, health_path="/metrics") as proxy,
        node(tiny_model, tmp_path, proxy.url, "--proxy-heartbeat-interval", "0.2") as server,
    ):
        wait_for(lambda: admitted(proxy.url) == [server.url], timeout=30)
        assert proxy.stop() == 0
        with serve_command(command, tmp_path, port=port, health_path="/metrics") as restarted:
            wait_for(lambda: admitted(restarted.url) == [server.url], timeout=30)
            # Removed by an operator (the same proxy): it stays out.
            httpx.post(f"{restarted.url}/nodes/remove", json={"url": server.url}, timeout=5)
            wait_for(lambda: registered(restarted.url) == [])
            with pytest.raises(AssertionError):
                wait_for(lambda: registered(restarted.url) != [], timeout=2)


def test_nodes_terminate_stops_a_node_that_allows_it(tiny_model: Path, tmp_path: Path) -> None:
    key = {"Authorization": "Bearer node-key"}
    with (
        proxy_process(tmp_path, "--no-state-file") as proxy,
        node(tiny_model, tmp_path, proxy.url, "--api-key", "node-key", headers=key) as refusing,
        node(
            tiny_model,
            tmp_path,
            proxy.url,
            "--api-key",
            "node-key",
            "--allow-terminate-by-client",
            headers=key,
        ) as allowing,
    ):
        wait_for(lambda: sorted(admitted(proxy.url)) == sorted([refusing.url, allowing.url]), timeout=30)
        # The node's own key guards it: a client without it cannot stop it.
        assert httpx.post(f"{allowing.url}/terminate", timeout=5).status_code == 401
        wrong = {"Authorization": "Bearer other"}
        assert httpx.post(f"{allowing.url}/terminate", headers=wrong, timeout=5).status_code == 401
        answer = httpx.post(f"{proxy.url}/nodes/terminate", json={"url": allowing.url}, timeout=30)
        assert answer.json() == {"url": allowing.url, "removed": True, "terminate_status": 200}
        assert allowing.process.wait(120) == 0
        answer = httpx.post(f"{proxy.url}/nodes/terminate?node_url={refusing.url}", timeout=30)
        assert answer.json()["terminate_status"] == 404  # no /terminate: removed, still running
        assert refusing.process.poll() is None
        assert registered(proxy.url) == []


def test_nodes_register_serve_through_the_proxy_and_deregister(tiny_model: Path, tmp_path: Path) -> None:
    with (
        proxy_process(tmp_path, "--no-state-file", "--routing-strategy", "cache_aware") as proxy,
        node(tiny_model, tmp_path, proxy.url) as first,
        node(tiny_model, tmp_path, proxy.url) as second,
    ):
        wait_for(lambda: sorted(admitted(proxy.url)) == sorted([first.url, second.url]), timeout=30)
        client = client_for(proxy.url)
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]
        kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        chunks = list(client.chat.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == full.choices[0].message.content
        completion = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=4)
        assert completion.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=MESSAGES)
        # A client that leaves mid-stream: the node aborts its sequence, its KV blocks come back.
        body = {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": 450,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
        for server in (first, second):
            wait_for(
                lambda s=server: metrics(s)[RUNNING] == 0 and metrics(s)[KV_FREE] == metrics(s)[KV_TOTAL]
            )
        wait_for(
            lambda: all(n["unfinished"] == 0 for n in httpx.get(f"{proxy.url}/nodes/status").json().values())
        )
        assert second.stop(timeout=120) == 0  # a clean shutdown deregisters
        assert list(httpx.get(f"{proxy.url}/nodes/status", timeout=5).json()) == [first.url]
        assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]


def replica_processes(parent: int) -> dict[int, psutil.Process]:
    """The live replicas of a `servekit serve --replicas` process, by port (a killed replica the
    parent has not reaped yet is a zombie, whose command line cannot be read: it is left out)."""
    found = {}
    for child in psutil.Process(parent).children():
        try:
            argv = child.cmdline()
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
        if "--port" in argv:
            found[int(argv[argv.index("--port") + 1])] = child
    return found


def test_replicas_survive_a_killed_replica(tiny_model: Path, tmp_path: Path) -> None:
    env = {
        **SERVER_ENV,
        "SERVEKIT_PROXY_HEALTH_CHECK_INTERVAL": FAST_CHECKS[1],
        "SERVEKIT_PROXY_ROUTING_STRATEGY": "round_robin",
    }
    with serve_script(
        "llm_serve.py", tmp_path, env=env, args=[str(tiny_model), "--replicas", "2"], wait=False
    ) as parent:
        wait_for(lambda: len(admitted(parent.url)) == 2, timeout=90)
        replicas = replica_processes(parent.process.pid)
        assert len(replicas) == 2
        client = client_for(parent.url)
        kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        for _ in range(4):
            assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
        # A long stream on each replica, then one replica killed: only the stream on it fails.
        body = {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        results: dict[int, list[str]] = {}
        started = threading.Barrier(3, timeout=60)

        def stream(index: int) -> None:
            with httpx.stream(
                "POST", f"{parent.url}/v1/chat/completions", json=body, timeout=120
            ) as response:
                events = []
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        if len(events) == 2:
                            started.wait()
                results[index] = events

        paused = [p for r in replicas.values() for p in (r, *r.children(recursive=True))]
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        started.wait()
        # The streams would finish in well under a second on this tiny model: pause every replica (and
        # its engine processes) while the streams are known to be in flight, check that round robin put
        # one on each, kill one replica, and let the other go on.
        victim_port, victim = next(iter(replicas.items()))
        try:
            for process in paused:
                process.suspend()
            status = httpx.get(f"{parent.url}/nodes/status", timeout=5).json()
            os.kill(victim.pid, signal.SIGKILL)
        finally:
            for process in paused:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()
        assert [n["unfinished"] for n in status.values()] == [1, 1]  # round robin: one stream on each
        for thread in threads:
            thread.join(120)
        outcomes = sorted("error" in events[-2] for events in results.values())
        assert outcomes == [False, True]
        assert all(events[-1] == "[DONE]" for events in results.values())
        for _ in range(4):  # the survivor serves everything meanwhile
            assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
        # restarted on its port and re-admitted
        wait_for(
            lambda: replica_processes(parent.process.pid).get(victim_port, victim).pid != victim.pid,
            timeout=30,
        )
        wait_for(lambda: len(admitted(parent.url)) == 2, timeout=90)
        replicas = replica_processes(parent.process.pid)
        # SIGTERM: the proxy drains, then each replica shuts down gracefully (slow on a busy machine)
        assert parent.stop(timeout=150) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in replicas.values())
