"""Soak: N minutes (default 10) of mixed load against `servekit serve` on a tiny random checkpoint
(or --model): chat (whole and streamed), completions, embeddings (a generation model answers them
with the documented 400), aborted streams and interactive sessions, from C concurrent clients.
Prints, per window, requests, unexpected errors, latency p50/p99 and the RSS of the server's
processes; at the end the totals, RSS growth (after the first window, which warms up) and latency
drift (the last full window's p50 over the second's).

    PYTHONPATH=src:. .venv/bin/python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from tests.e2e.serving import serve_script
from tests.reliability.storm import Resources, server_pids

MODEL = "tiny-llama"
ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "512", "SERVEKIT_DISABLE_LOG_REQUESTS": "true"}
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)


class Soak:
    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.window = Window()
        self.ids = itertools.count()

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.window.errors.append(what)

    async def chat(self) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24}
        answer = await self.client.post(f"{self.url}/v1/chat/completions", json=body)
        self.expect(answer.status_code == 200, f"chat {answer.status_code}")

    async def chat_stream(self) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "stream": True}
        async with self.client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as answer:
            lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
        self.expect(
            answer.status_code == 200 and lines[-1:] == ["data: [DONE]"], f"chat stream {answer.status_code}"
        )

    async def completion(self) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24}
        answer = await self.client.post(f"{self.url}/v1/completions", json=body)
        self.expect(answer.status_code == 200, f"completion {answer.status_code}")

    async def embeddings(self) -> None:
        answer = await self.client.post(f"{self.url}/v1/embeddings", json={"model": MODEL, "input": "fox"})
        self.expect(
            answer.status_code == 400 and answer.json()["error"]["code"] == "model_not_supported",
            f"embeddings {answer.status_code}",
        )

    async def abort(self) -> None:
        rid = f"soak-{next(self.ids)}"
        body = {
            "model": MODEL,
            "prompt": "go",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
            "request_id": rid,
        }
        async with self.client.stream("POST", f"{self.url}/v1/completions", json=body) as answer:
            events = answer.aiter_lines()
            await anext(events)
            aborted = await self.client.post(f"{self.url}/abort_request", json={"rid": rid})
            rest = [line async for line in events if line.startswith("data: ")]
        self.expect(aborted.status_code == 200 and aborted.json()["aborted"], f"abort {aborted.status_code}")
        self.expect(rest[-1:] == ["data: [DONE]"], "aborted stream did not end with [DONE]")

    async def interactive(self) -> None:
        session = next(self.ids) + 1
        for prompt in ("Hello.", "And then?"):
            body = {"session_id": session, "prompt": prompt, "interactive_mode": True, "max_tokens": 8}
            answer = await self.client.post(f"{self.url}/v1/chat/interactive", json=body)
            self.expect(answer.status_code == 200, f"interactive {answer.status_code}")
        end = await self.client.post(
            f"{self.url}/v1/chat/interactive", json={"session_id": session, "end": True}
        )
        self.expect(end.status_code == 200 and orjson.loads(end.content)["ended"], f"end {end.status_code}")

    def operations(self) -> list[tuple[str, Callable[[], Awaitable[None]], float]]:
        return [
            ("chat", self.chat, 3),
            ("chat_stream", self.chat_stream, 3),
            ("completion", self.completion, 3),
            ("embeddings", self.embeddings, 1),
            ("abort", self.abort, 1),
            ("interactive", self.interactive, 1),
        ]

    async def client_loop(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        names, calls, weights = zip(*self.operations(), strict=True)
        while time.monotonic() < until:
            index = rng.choices(range(len(calls)), weights)[0]
            started = time.monotonic()
            try:
                await calls[index]()
            except (httpx.HTTPError, KeyError, ValueError, StopAsyncIteration) as error:
                self.window.errors.append(f"{names[index]}: {type(error).__name__}: {error}")
            self.window.latencies.append(time.monotonic() - started)
            self.window.kinds[names[index]] = self.window.kinds.get(names[index], 0) + 1


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else (values or [0.0])[0]


async def run(url: str, pids: list[int], minutes: float, concurrency: int, window_s: float) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        soak = Soak(client, url)
        until = time.monotonic() + minutes * 60
        loops = [asyncio.ensure_future(soak.client_loop(seed, until)) for seed in range(concurrency)]
        rows: list[tuple[int, int, float, float, int]] = []
        full_windows = 0  # the last window, in which the clients finish their last requests, is short
        print("window  requests  errors  p50_s  p99_s  rss_MiB")
        while not all(loop.done() for loop in loops):
            await asyncio.wait(loops, timeout=window_s)
            window, soak.window = soak.window, Window()
            if not all(loop.done() for loop in loops):
                full_windows += 1
            rss = Resources.of(pids).rss
            p50, p99 = quantile(window.latencies, 0.5), quantile(window.latencies, 0.99)
            rows.append((len(window.latencies), len(window.errors), p50, p99, rss))
            print(
                f"{len(rows):6d}  {len(window.latencies):8d}  {len(window.errors):6d}  {p50:5.2f}  {p99:5.2f}  {rss / 2**20:7.1f}"
            )
            for error in window.errors[:5]:
                print("   error:", error)
        await asyncio.gather(*loops)
    total = sum(r[0] for r in rows)
    errors = sum(r[1] for r in rows)
    growth = (rows[-1][4] / rows[0][4] - 1) * 100 if len(rows) > 1 else 0.0
    last = full_windows if full_windows > 2 else len(rows)
    drift = rows[last - 1][2] / rows[1][2] if len(rows) > 2 and rows[1][2] else 1.0
    print(
        f"total {total} requests, {errors} unexpected errors; RSS {growth:+.1f}% after the first window; "
        f"p50 last full window (#{last})/second window {drift:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--model", default=None, help="a model to serve instead of a tiny random one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.llm.tiny_models import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tmp) / "tiny-llama", "llama"))
        env = {**ENV, "SERVEKIT_SERVED_MODEL_NAME": MODEL}
        with serve_script("llm_serve.py", Path(tmp), env=env, args=[model]) as server:
            asyncio.run(
                run(server.url, server_pids(server.process.pid), args.minutes, args.concurrency, args.window)
            )


if __name__ == "__main__":
    main()
