"""`servekit proxy` benchmarks, each ratio measured in the same run.

overhead: short non-streamed completions (max_tokens 1) through the proxy vs direct to the one node
behind it: latency p50 one request at a time (the two paths alternate request by request, so drift
hits both), then throughput at concurrency C (direct and proxied runs alternate, ``--repeats`` times). With
``--stub-node`` the node is a stub that answers at once: only the proxy's own cost is left to see;
``--stub-delay-ms`` makes it answer as late as a model node would, idle meanwhile (the proxy then
wakes up cold for every request, as in front of a model node).

routing: R replicas, S sessions each with its own long system prompt sent T times (a new question
each turn, sessions interleaved), at concurrency C, once per strategy (random, session, cache_aware):
prefix-cache hit rate (the nodes' own counters) and TTFT p50. Nodes' caches are flushed between runs.

    .venv/bin/python benchmarks/bench_proxy.py overhead [--model M | --stub-node] [--requests 200] [--concurrency 8]
    .venv/bin/python benchmarks/bench_proxy.py routing [--model M] [--replicas 2] [--sessions 16] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
from bench_serve import free_port, stop, wait_healthy

from servekit.bench.report import percentile
from servekit.cpu import cpu_model

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO / "src"),
    "SERVEKIT_LOG_LEVEL": "warning",
    "SERVEKIT_DISABLE_LOG_REQUESTS": "true",
    "OMP_NUM_THREADS": "1",
}
STRATEGIES = ("random", "session", "cache_aware")


@contextlib.contextmanager
def process(args: list[str], url: str, health: str = "/health") -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "servekit.cli", *args], env=ENV, start_new_session=True)
    try:
        wait_healthy(url, proc, path=health)
        yield proc
    finally:
        stop(proc)


def node_args(model: str | None, port: int, threads: int) -> list[str]:
    return [
        "serve",
        *([model] if model else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-threads",
        str(threads),
    ]


def proxy_args(port: int, strategy: str, nodes: list[str]) -> list[str]:
    args = ["proxy", "--host", "127.0.0.1", "--port", str(port), "--routing-strategy", strategy]
    args += ["--no-state-file", "--health-check-interval", "0.5", "--log-level", "warning"]
    for url in nodes:
        args += ["--node", url]
    return args


def percentiles(values: list[float]) -> dict[str, float]:
    """Mean and p50/p90/p99 (``servekit bench``'s interpolation)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    found = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    return {"mean": statistics.fmean(values), **found}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_id(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


# ---------------------------------------------------------------------------------------- overhead
async def completion(session: aiohttp.ClientSession, url: str, model: str, index: int) -> float:
    body = {"model": model, "prompt": f"Count: {index % 50}", "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - started


WARM_UP = 5


async def latencies(direct: str, proxied: str, model: str, count: int) -> tuple[list[float], list[float]]:
    """``count`` pairs, one request of each path, alternating so that both see the same machine; the
    order within a pair alternates too (direct first in even pairs), so neither path always runs
    right after the other."""
    async with aiohttp.ClientSession() as session:
        for url in (direct, proxied):
            for i in range(WARM_UP):
                await completion(session, url, model, i)
        a, b = [], []
        for i in range(count):
            if i % 2 == 0:
                a.append(await completion(session, direct, model, i))
                b.append(await completion(session, proxied, model, i))
            else:
                b.append(await completion(session, proxied, model, i))
                a.append(await completion(session, direct, model, i))
        return a, b


def run_seconds(pid: int) -> float:
    """CPU time of a process's live threads in nanoseconds' resolution (/proc/PID/task/*/schedstat),
    where /proc/PID/stat counts clock ticks (10 ms): for the small figure of an idle process."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def idle_cpu_rate(pid: int, seconds: float) -> float:
    """CPU seconds per second a process spends with no request to serve (the proxy's health checks
    and load scrapes, uvicorn's tick): the share of "CPU per request" that is not the requests'."""
    before, started = run_seconds(pid), time.monotonic()
    time.sleep(seconds)  # a measuring window, not a synchronisation
    return (run_seconds(pid) - before) / (time.monotonic() - started)


def added_by_order(a: list[float], b: list[float]) -> str:
    """The median paired difference of the pairs where direct went first, of those where the proxy
    did, and of each third of the run (its spread)."""
    pairs = [y - x for x, y in zip(a, b, strict=True)]
    parts = [("direct first", pairs[0::2]), ("proxy first", pairs[1::2])]
    third = max(len(pairs) // 3, 1)
    parts += [
        (f"pairs {k * third}-{(k + 1) * third - 1}", pairs[k * third : (k + 1) * third]) for k in range(3)
    ]
    return ", ".join(f"{name} {statistics.median(v) * 1e3:+.2f} ms" for name, v in parts if v)


async def throughput(url: str, model: str, count: int, concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int) -> None:
            async with semaphore:
                await completion(session, url, model, i)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - started)


@contextlib.contextmanager
def stub_node(port: int, url: str, delay_ms: float) -> Iterator[subprocess.Popen[bytes]]:
    script = Path(__file__).resolve().parent / "stub_node.py"
    command = [sys.executable, str(script), str(port), str(delay_ms)]
    proc = subprocess.Popen(command, env=ENV, start_new_session=True)
    try:
        wait_healthy(url, proc)
        yield proc
    finally:
        stop(proc)


def overhead(args: argparse.Namespace) -> None:
    node_port, proxy_port = free_port(), free_port()
    direct, proxied = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{proxy_port}"
    node_process = (
        stub_node(node_port, direct, args.stub_delay_ms)
        if args.stub_node
        else process(node_args(args.model, node_port, args.threads), direct)
    )
    with (
        node_process as node,
        process(proxy_args(proxy_port, "least_load", [direct]), proxied) as proxy,
    ):
        model = model_id(direct)
        idle = idle_cpu_rate(proxy.pid, args.idle_seconds)
        cpu_before = cpu_seconds(proxy.pid), cpu_seconds(node.pid)
        started = time.monotonic()
        a, b = asyncio.run(latencies(direct, proxied, model, args.requests))
        latency_wall = time.monotonic() - started
        cpu_proxy = cpu_seconds(proxy.pid) - cpu_before[0]
        cpu_node = cpu_seconds(node.pid) - cpu_before[1]
        p_direct, p_proxy = percentiles(a), percentiles(b)
        rates: dict[str, list[float]] = {"direct": [], "proxy": []}
        for _ in range(args.repeats):
            rates["direct"].append(asyncio.run(throughput(direct, model, args.requests, args.concurrency)))
            rates["proxy"].append(asyncio.run(throughput(proxied, model, args.requests, args.concurrency)))
    print(f"CPU: {cpu_model()}; load average before the run: {os.getloadavg()[0]:.1f}")
    print(
        f"latency p50: direct {p_direct['p50'] * 1e3:.2f} ms, proxy {p_proxy['p50'] * 1e3:.2f} ms, added {(p_proxy['p50'] - p_direct['p50']) * 1e3:+.2f} ms"
    )
    added = statistics.median(y - x for x, y in zip(a, b, strict=True))
    print(f"added latency, median of paired differences: {added * 1e3:+.2f} ms ({args.requests} pairs)")
    print(f"  by order and by third of the run: {added_by_order(a, b)}")
    # CPU time does not depend on how busy the machine is, unlike latencies on a shared machine.
    proxied_count = args.requests + WARM_UP
    net = cpu_proxy - idle * latency_wall
    print(
        f"CPU per proxied request: proxy {cpu_proxy / proxied_count * 1e3:.2f} ms, "
        f"{net / proxied_count * 1e3:.2f} ms without its idle {idle * 1e3:.1f} ms/s "
        f"(node, for each direct + proxied pair: {cpu_node / (2 * proxied_count) * 1e3:.2f} ms per request)"
    )
    print(f"latency p90: direct {p_direct['p90'] * 1e3:.2f} ms, proxy {p_proxy['p90'] * 1e3:.2f} ms")
    d, p = statistics.median(rates["direct"]), statistics.median(rates["proxy"])
    runs = " / ".join(f"{x:.1f}:{y:.1f}" for x, y in zip(rates["direct"], rates["proxy"], strict=True))
    print(f"throughput at c={args.concurrency}, req/s (direct:proxy per run): {runs}")
    print(f"throughput medians: direct {d:.1f}, proxy {p:.1f} req/s, proxy/direct {p / d:.1%}")


# ----------------------------------------------------------------------------------------- routing
def system_prompt(session: int) -> str:
    topics = ("astronomy", "baking", "carpentry", "diving", "economics", "falconry", "geology", "harmony")
    topic = topics[session % len(topics)]
    rules = " ".join(
        f"Rule {k}: when asked about {topic}, answer with care, cite the basics, and stay brief."
        for k in range(12)
    )
    return f"Session {session}. You are an expert on {topic}. {rules}"


async def chat_ttft(session: aiohttp.ClientSession, url: str, model: str, sid: int, turn: int) -> float:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system_prompt(sid)},
            {"role": "user", "content": f"Question {turn}: what matters most?"},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "user": f"user-{sid}",
    }
    started = time.perf_counter()
    ttft = 0.0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if ttft == 0.0 and line.startswith(b"data: ") and b'"content"' in line:
                ttft = time.perf_counter() - started
    return ttft or time.perf_counter() - started


async def workload(url: str, model: str, sessions: int, turns: int, concurrency: int) -> list[float]:
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(sid: int, turn: int) -> float:
            async with semaphore:
                return await chat_ttft(session, url, model, sid, turn)

        results = []
        for turn in range(turns):  # sessions interleaved: turn t of every session, then turn t+1
            results += await asyncio.gather(*(one(s, turn) for s in range(sessions)))
        return results


def cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("servekit:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("servekit:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def routing(args: argparse.Namespace) -> None:
    ports = [free_port() for _ in range(args.replicas)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rows = []
    with contextlib.ExitStack() as stack:
        for port, url in zip(ports, urls, strict=True):
            stack.enter_context(process(node_args(args.model, port, args.threads), url))
        model = model_id(urls[0])
        for strategy in STRATEGIES:
            for url in urls:
                httpx.post(f"{url}/flush_cache", timeout=30).raise_for_status()
            proxy_port = free_port()
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            with process(proxy_args(proxy_port, strategy, urls), proxy_url):
                hits0, queries0 = cache_counters(urls)
                ttfts = asyncio.run(workload(proxy_url, model, args.sessions, args.turns, args.concurrency))
                hits1, queries1 = cache_counters(urls)
            rate = (hits1 - hits0) / max(queries1 - queries0, 1.0)
            rows.append((strategy, rate, percentiles(ttfts)))
    print(f"CPU: {cpu_model()}; load average: {os.getloadavg()[0]:.1f}")
    print(
        f"{args.replicas} replicas, {args.sessions} sessions x {args.turns} turns, concurrency {args.concurrency}"
    )
    base = rows[0][2]["p50"]
    print("| strategy | prefix-cache hit rate | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p50 vs random |")
    print("|---|---:|---:|---:|---:|")
    for strategy, rate, ttft in rows:
        print(
            f"| {strategy} | {rate:.1%} | {ttft['p50'] * 1e3:.0f} | {ttft['p90'] * 1e3:.0f} | {ttft['p50'] / base:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("overhead", "routing"))
    parser.add_argument("--model", default=None, help="the nodes' model (default: servekit serve's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument(
        "--stub-node",
        action="store_true",
        help="overhead: behind the proxy a stub that answers at once (benchmarks/stub_node.py), not a model",
    )
    parser.add_argument(
        "--stub-delay-ms",
        type=float,
        default=0.0,
        help="overhead: the stub answers a completion this late, idle meanwhile (as a node's model step)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=3.0,
        help="overhead: how long the proxy's idle CPU is measured before the latency loop",
    )
    args = parser.parse_args()
    overhead(args) if args.mode == "overhead" else routing(args)


if __name__ == "__main__":
    main()
