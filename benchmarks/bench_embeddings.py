"""Embeddings benchmark: the all-MiniLM-L6-v2 example server vs the same model offline, same run.

1. Offline baseline: the model in this process, batches of 32 sentences (``--offline-threads``).
2. servekit: ``examples/embedding_server.py`` (dynamic batching, ``--server-threads`` torch threads),
   loaded by an asyncio/aiohttp client at ``--concurrency`` with ONE sentence per request
   (base64 encoding, as the ``openai`` client asks), bounded by ``--requests`` and ``--duration``.
3. Optionally (``--litserve``) LitServe's OpenAIEmbeddingSpec serving the same model, same load
   (``benchmarks/apps/litserve_embedding.py``).
4. The offline baseline again (the machine is shared: the mean of both runs is the reference).

Prints sentences/s and the ratio to offline, and checks one served vector against the offline one.

    HF_HUB_OFFLINE=1 python benchmarks/bench_embeddings.py [--concurrency 64] [--litserve]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORDS = [
    "the",
    "a",
    "model",
    "server",
    "request",
    "vector",
    "sentence",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "city",
    "river",
    "mountain",
    "music",
    "science",
    "history",
    "language",
    "computer",
    "network",
    "learning",
    "data",
    "cloud",
    "green",
    "blue",
    "red",
    "small",
    "large",
    "happy",
    "quiet",
    "bright",
    "ancient",
    "modern",
    "simple",
    "complex",
    "question",
    "answer",
    "table",
    "window",
    "garden",
    "morning",
    "evening",
    "winter",
    "summer",
    "travel",
    "market",
    "coffee",
    "book",
    "paper",
    "story",
]


def make_sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 20))).capitalize() + "." for _ in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- offline
def offline_throughput(sentences: list[str], threads: int, batch_size: int, min_seconds: float) -> float:
    import torch

    sys.path.insert(0, str(REPO))
    from examples.embedding_server import MiniLMEncoder

    torch.set_num_threads(threads)
    encoder = MiniLMEncoder("cpu")
    encoder.encode(sentences[:batch_size])  # warm-up
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in range(0, len(sentences), batch_size):
            encoder.encode(sentences[i : i + batch_size])
            done += len(sentences[i : i + batch_size])
    return done / (time.perf_counter() - start)


def offline_vector(text: str) -> np.ndarray:
    sys.path.insert(0, str(REPO))
    from examples.embedding_server import MiniLMEncoder

    vectors: np.ndarray = MiniLMEncoder("cpu").encode([text])["embeddings"][0]
    return vectors


# ----------------------------------------------------------------------------- servers
@contextlib.contextmanager
def running(command: list[str], env: dict[str, str]) -> Iterator[str]:
    import httpx

    port = free_port()
    full_env = {
        **os.environ,
        **env,
        "PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "SERVEKIT_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }
    process = subprocess.Popen(
        command, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)  # polling another process's readiness, bounded by the deadline
        else:
            raise TimeoutError(f"{command} not healthy")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


async def load(
    url: str, sentences: list[str], concurrency: int, total: int, duration: float
) -> dict[str, Any]:
    """``concurrency`` closed-loop clients, one sentence per request, until ``total`` or ``duration``."""
    import aiohttp

    next_index = 0
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, errors
        while next_index < total and time.perf_counter() < deadline:
            text = sentences[next_index % len(sentences)]
            next_index += 1
            body = {"model": "all-MiniLM-L6-v2", "input": text, "encoding_format": "base64"}
            started = time.perf_counter()
            async with session.post(f"{url}/v1/embeddings", json=body) as response:
                reply = await response.json()
                if response.status != 200 or len(reply["data"]) != 1:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def warm_up() -> None:
            async with session.post(
                f"{url}/v1/embeddings", json={"model": "m", "input": "warm up"}
            ) as response:
                await response.read()

        # Warm-up: every connection, and the model's first batches.
        await asyncio.gather(*(warm_up() for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "sentences_per_s": len(latencies) / elapsed,
        "completed": len(latencies),
        "errors": errors,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def served_vector(url: str, text: str) -> np.ndarray:
    import httpx

    reply = httpx.post(
        f"{url}/v1/embeddings", json={"model": "m", "input": text, "encoding_format": "base64"}, timeout=30
    )
    return np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), dtype="<f4")


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6000, help="upper bound on requests per server")
    parser.add_argument("--duration", type=float, default=20.0, help="upper bound in seconds per server")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--offline-threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--litserve", action="store_true", help="also measure LitServe's embedding spec")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentences = make_sentences(1024)

    offline_before = offline_throughput(sentences[:320], args.offline_threads, 32, min_seconds=8.0)
    print(f"offline (batch 32, {args.offline_threads} threads): {offline_before:.0f} sentences/s", flush=True)
    env = {
        "TORCH_THREADS": str(args.server_threads),
        "MAX_BATCH_SIZE": str(args.max_batch_size),
        "BATCH_TIMEOUT": str(args.batch_timeout),
    }
    results: dict[str, dict[str, Any]] = {}
    commands = {"servekit": [sys.executable, str(REPO / "examples" / "embedding_server.py")]}
    if args.litserve:
        commands["litserve"] = [sys.executable, str(HERE / "apps" / "litserve_embedding.py")]
    for name, command in commands.items():
        with running(command, env) as url:
            results[name] = asyncio.run(load(url, sentences, args.concurrency, args.requests, args.duration))
            if name == "servekit":
                error = float(np.abs(served_vector(url, sentences[0]) - offline_vector(sentences[0])).max())
                results[name]["max_abs_diff"] = error
        print(f"{name}: {results[name]}", flush=True)
    offline_after = offline_throughput(sentences[:320], args.offline_threads, 32, min_seconds=8.0)
    print(f"offline again: {offline_after:.0f} sentences/s", flush=True)
    offline = statistics.mean([offline_before, offline_after])

    print()
    print("| setup | sentences/s | vs offline | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| offline, batch 32, {args.offline_threads} torch threads (mean of 2 runs) | {offline:.0f} | 1.00 | | | |"
    )
    for name, result in results.items():
        print(
            f"| {name} server, concurrency {args.concurrency}, 1 sentence/request | "
            f"{result['sentences_per_s']:.0f} | {result['sentences_per_s'] / offline:.2f} | "
            f"{result['p50_ms']:.0f} | {result['p99_ms']:.0f} | {result['errors']} |"
        )
    if "max_abs_diff" in results.get("servekit", {}):
        print(f"\nservekit vector vs offline: max abs diff {results['servekit']['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
