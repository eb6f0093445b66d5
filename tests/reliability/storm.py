"""A disconnect storm: many generation requests whose clients vanish at random points, over raw
sockets (so the cut lands exactly where it is meant to), and the server's resources around it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import psutil

# Where the client goes away: before its request is complete, right after sending it (during the
# prefill of a long prompt), once the answer's headers arrived, or after some of the stream.
CUTS = ("partial_request", "prefill", "first_byte", "mid_stream")
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


def request_bodies(model: str) -> list[tuple[str, dict[str, Any]]]:
    chat = {"role": "user", "content": "Tell me a long story."}
    return [
        ("/v1/chat/completions", {"model": model, "messages": [chat], "stream": True}),
        ("/v1/completions", {"model": model, "prompt": "Once upon a time", "stream": True}),
        ("/generate", {"text": "Once upon a time", "stream": True, "sampling_params": {}}),
        ("/v1/chat/completions", {"model": model, "messages": [chat], "stream": False}),
    ]


def _with_tokens(path: str, body: dict[str, Any], max_tokens: int, long_prompt: bool) -> dict[str, Any]:
    body = dict(body)
    if path == "/generate":
        body["sampling_params"] = {"max_new_tokens": max_tokens, "ignore_eos": True}
        if long_prompt:
            body["text"] = LONG_PROMPT
    else:
        body.update(max_tokens=max_tokens, ignore_eos=True)
        if long_prompt and "prompt" in body:
            body["prompt"] = LONG_PROMPT
        elif long_prompt:
            body["messages"] = [{"role": "user", "content": LONG_PROMPT}]
    return body


@dataclass
class StormReport:
    cuts: Counter[str] = field(default_factory=Counter)
    completed_before_cut: int = 0  # answers that ended before the planned cut point


async def _one(host: str, port: int, path: str, body: dict[str, Any], cut: str, rng: random.Random) -> bool:
    """Send one request and vanish at ``cut``; True if the answer ended before the cut point."""
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if rng.random() < 0.5:  # half the cuts are resets (RST), half orderly closes (FIN)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if cut == "partial_request":
            writer.write(head + payload[: max(1, len(payload) // 2)])
            await writer.drain()
            return False
        writer.write(head + payload)
        await writer.drain()
        if cut == "prefill":
            await asyncio.sleep(rng.uniform(0, 0.02))  # a random point of the prefill, not a sync
            return False
        if not await reader.readuntil(b"\r\n\r\n"):
            return True
        if cut == "first_byte":
            return False
        for _ in range(rng.randint(1, 12)):
            line = await reader.readline()
            if not line:
                return True
        return False
    except (asyncio.IncompleteReadError, ConnectionError):
        return True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def storm(
    url: str, n: int, *, seed: int, model: str, max_tokens: int = 48, concurrency: int = 16
) -> StormReport:
    """``n`` requests, cut at seeded random points, ``concurrency`` at a time."""
    host, port = httpx.URL(url).host, int(httpx.URL(url).port or 80)
    rng = random.Random(seed)
    report = StormReport()
    bodies = request_bodies(model)
    limit = asyncio.Semaphore(concurrency)

    async def run(index: int) -> None:
        path, body = bodies[index % len(bodies)]
        cut = rng.choice(CUTS)
        body = _with_tokens(path, body, max_tokens, long_prompt=cut == "prefill")
        report.cuts[cut] += 1
        async with limit:
            if await _one(host, port, path, body, cut, random.Random(rng.random())):
                report.completed_before_cut += 1

    await asyncio.gather(*(run(i) for i in range(n)))
    return report


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@dataclass(frozen=True)
class Resources:
    fds: dict[int, int]  # pid -> open file descriptors
    rss: int  # bytes, summed over the processes

    @classmethod
    def of(cls, pids: list[int]) -> Resources:
        processes = [psutil.Process(pid) for pid in pids]
        return cls({p.pid: p.num_fds() for p in processes}, sum(p.memory_info().rss for p in processes))


def server_pids(root_pid: int) -> list[int]:
    """The server process and every process it started (front(s) and inference workers)."""
    root = psutil.Process(root_pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = predicate()
            if last:
                return
        time.sleep(0.1)  # polling a server's public state, bounded by the deadline
    raise AssertionError(f"{what}: not met in {timeout}s (last: {last!r})")
