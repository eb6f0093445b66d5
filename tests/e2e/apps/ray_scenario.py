"""The Ray replicas scenario, run inside a network namespace of its own (only loopback): `servekit
serve MODEL --replicas 2 --ray-address local` on a local single-node Ray cluster; requests through its
proxy with the openai client; one replica's server killed, Ray restarts the actor, the new replica is
registered and the old address dropped; SIGTERM stops everything. Exit code 0 when every check passed.

    python ray_scenario.py MODEL_DIR LOG_DIR
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.e2e.proxying import admitted, wait_for  # noqa: E402
from tests.e2e.serving import free_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


def servers_of(root: int, ports: set[int]) -> list[psutil.Process]:
    """The replicas' `servekit serve` processes among ``root``'s descendants (Ray's workers are), by port."""
    found = []
    for proc in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline()
            if "serve" in argv and "--port" in argv and int(argv[argv.index("--port") + 1]) in ports:
                found.append(proc)
    return found


def gone(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    return True


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def main() -> int:
    model, logs = sys.argv[1], Path(sys.argv[2])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "RAY_USAGE_STATS_ENABLED": "0",
        "SERVEKIT_NUM_THREADS": "1",
        "SERVEKIT_MAX_MODEL_LEN": "512",
        "SERVEKIT_LOG_LEVEL": "warning",
        "SERVEKIT_PROXY_HEALTH_CHECK_INTERVAL": "0.2",
        "SERVEKIT_PROXY_ROUTING_STRATEGY": "round_robin",
    }

    def serve_command(replicas: int, cpus: str, serve_port: int) -> list[str]:
        command = [sys.executable, "-m", "servekit.cli", "serve", model, "--replicas", str(replicas)]
        command += ["--ray-address", "local", "--num-cpus-per-replica", cpus]
        return [*command, "--host", "127.0.0.1", "--port", str(serve_port)]

    too_big = subprocess.run(
        serve_command(3, "1", free_port()), env=env, capture_output=True, text=True, timeout=180
    )
    assert too_big.returncode == 2, too_big.stderr[-2000:]
    assert "need 3 CPUs" in too_big.stderr, too_big.stderr[-2000:]
    command = serve_command(2, "0.5", port)
    with open(logs / "ray-serve.log", "w") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen: list[psutil.Process] = []
    try:
        wait_for(lambda: len(admitted(url)) == 2, timeout=240)
        first = admitted(url)
        seen += servers_of(server.pid, {port_of(u) for u in first})
        assert len(seen) == 2, seen
        assert all(u.startswith("http://127.0.0.1:") for u in first), first
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        for _ in range(4):
            assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
        victim = first[0]
        (process,) = servers_of(server.pid, {port_of(victim)})
        process.kill()
        for _ in range(4):  # the survivor serves meanwhile (a request on the victim is retried)
            assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
        # Ray restarts the actor; its new server registers, the dead address is gone
        wait_for(lambda: len(admitted(url)) == 2 and victim not in admitted(url), timeout=240)
        assert victim not in httpx.get(f"{url}/nodes/status", timeout=5).json()
        seen += servers_of(server.pid, {port_of(u) for u in admitted(url)})
        assert client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert code == 0, code
    deadline = time.monotonic() + 30
    while not all(gone(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.2)  # replicas exiting after their actors were stopped, bounded
    assert all(gone(p) for p in seen), [p.pid for p in seen if not gone(p)]
    with contextlib.suppress(OSError):
        print("ray scenario: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
