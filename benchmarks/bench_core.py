"""Serving-core benchmark: servekit vs plain FastAPI (and LitServe where installed), same run.

Closed loop with wrk (2 threads, 64 connections) against each server in turn on 127.0.0.1; hello
world (POST /predict {"input": 4.0}) and a 10-chunk stream. Also the idle CPU of each server's
process tree. Prints a table with ratios to FastAPI's figures measured in this same run.

    python benchmarks/bench_core.py [--duration 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
LUA = """wrk.method = "POST"
wrk.body = '{"input": 4.0}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(kind: str, flavour: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "SERVEKIT_LOG_LEVEL": "warning",
        "PYTHONPATH": str(HERE.parent / "src"),
    }
    process = subprocess.Popen(
        [sys.executable, str(HERE / "apps" / "core_servers.py"), kind, flavour],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(f"{url}/predict", json={"input": 4.0}, timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{kind} server did not come up")
        yield url, process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def run_wrk(url: str, duration: int, connections: int, script: Path) -> tuple[float, float]:
    """Requests/s and p99 latency in ms."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/predict",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    match = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert match is not None, out
    value, unit = float(match.group(1)), match.group(2)
    p99_ms = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return rps, p99_ms


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pids.extend(int(c) for c in children)
    return total


def idle_cpu_percent(pid: int, seconds: float = 5.0) -> float:
    before = tree_cpu_seconds(pid)
    time.sleep(seconds)  # measuring idleness: nothing to synchronise with
    return 100.0 * (tree_cpu_seconds(pid) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    kinds = ["fastapi", "servekit"] + (["litserve"] if importlib.util.find_spec("litserve") else [])
    script = Path(tempfile.mkdtemp(prefix="bench-core-")) / "post_input.lua"
    script.write_text(LUA)
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    for flavour in ("hello", "stream"):
        for kind in kinds:
            with server(kind, flavour) as (url, pid):
                run_wrk(url, 2, args.connections, script)  # warm-up
                rps, p99 = run_wrk(url, args.duration, args.connections, script)
                idle = idle_cpu_percent(pid) if flavour == "hello" else float("nan")
                results[(kind, flavour)] = (rps, p99, idle)
                print(
                    f"{flavour:6} {kind:9} {rps:9.0f} req/s  p99 {p99:8.2f} ms  idle CPU {idle:5.2f}%",
                    flush=True,
                )
    print()
    print(
        "| workload | server | req/s | p99 ms | idle CPU % | req/s vs FastAPI | p99 vs FastAPI | req/s vs LitServe |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for flavour in ("hello", "stream"):
        base_rps, base_p99, _ = results[("fastapi", flavour)]
        lit = results.get(("litserve", flavour))
        for kind in kinds:
            rps, p99, idle = results[(kind, flavour)]
            vs_lit = f"{rps / lit[0]:.2f}x" if lit else "-"
            print(
                f"| {flavour} | {kind} | {rps:.0f} | {p99:.2f} | {idle:.2f} | {rps / base_rps:.2f} | "
                f"{p99 / base_p99:.2f} | {vs_lit} |"
            )


if __name__ == "__main__":
    main()
