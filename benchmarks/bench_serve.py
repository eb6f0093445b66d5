"""Serving benchmark in the manner of ``vllm bench serve``: N prompts at concurrency C over HTTP.

Starts ``servekit serve`` on 127.0.0.1, streams ``/v1/completions`` requests (fixed output length,
``ignore_eos``), and reports TTFT, TPOT and ITL percentiles plus request and output-token
throughput; then runs the same prompts through the engine offline (``servekit.llm.LLM``) in the same
run and prints the ratio. Bounded: a fixed number of prompts and a per-request timeout.

    .venv/bin/python benchmarks/bench_serve.py --num-prompts 64 --concurrency 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[1]
TOPICS = [
    "a fox who learns to fly",
    "the history of bread",
    "how rivers shape valleys",
    "a robot that paints",
    "the life of a lighthouse keeper",
    "why the sky is blue",
    "a city under the sea",
    "the first winter on Mars",
]


def make_prompts(count: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (part {i})." for i in range(count)]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


async def one_request(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, seed: int
) -> RequestResult:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    last = started
    result = RequestResult(ok=False)
    text_chunks = 0
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return result
            async for raw in response.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"] or not chunk["choices"][0]["text"]:
                    continue
                text_chunks += 1
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
        result.latency = time.perf_counter() - started
        result.output_tokens = result.output_tokens or text_chunks  # servers without usage in streams
        result.ok = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as error:
        result.error = repr(error)
    return result


async def run_load(
    base_url: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[list[RequestResult], float]:
    """aiohttp, as ``vllm bench serve`` uses: the load generator shares the server's 2 cores here,
    so a light client matters (httpx cost about twice the CPU per streamed token)."""
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def limited(index: int, prompt: str) -> RequestResult:
            async with semaphore:
                return await one_request(session, f"{base_url}/v1/completions", prompt, max_tokens, index)

        # Warm-up: one request, so the first measured request does not pay one-time costs.
        await one_request(session, f"{base_url}/v1/completions", "warm up", 4, 0)
        started = time.perf_counter()
        results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
        return list(results), time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str | None, port: int, threads: int, max_num_seqs: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "SERVEKIT_NUM_THREADS": str(threads),
        "SERVEKIT_LOG_LEVEL": "warning",
        "SERVEKIT_DISABLE_LOG_REQUESTS": "true",
    }
    args = [sys.executable, "-m", "servekit.cli", "serve", *([model] if model else [])]
    args += ["--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    return subprocess.Popen(args, env=env, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during startup")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not healthy in time")


def offline_throughput(
    model: str | None, prompts: list[str], max_tokens: int, threads: int, max_num_seqs: int
) -> float:
    sys.path.insert(0, str(REPO / "src"))
    from servekit.llm import LLM, SamplingParams

    llm = LLM(model, num_threads=threads, max_num_seqs=max_num_seqs)
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    params = [
        SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=i)
        for i in range(len(prompts))
    ]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    del llm  # free its KV cache before the server (or the next run) allocates one
    gc.collect()
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (server and offline)")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts)
    max_num_seqs = max(args.concurrency, 1)

    offline_runs: list[float] = []
    if not args.skip_offline:  # before and after serving: the machine's load may change meanwhile
        offline_runs.append(
            offline_throughput(args.model, prompts, args.max_tokens, args.threads, max_num_seqs)
        )
    process = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(args.model, port, args.threads, max_num_seqs)
    try:
        if process is not None:
            wait_healthy(url, process)
        results, elapsed = asyncio.run(run_load(url, prompts, args.concurrency, args.max_tokens))
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    good = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttft = percentiles([r.ttft * 1000 for r in good])
    tpot = percentiles(
        [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in good if r.output_tokens > 1]
    )
    itl = percentiles([x * 1000 for r in good for x in r.itls])
    serving_tps = tokens / elapsed
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default)'}")
    print(
        f"prompts: {args.num_prompts}  concurrency: {args.concurrency}  output tokens/request: {args.max_tokens}"
    )
    print(f"successful requests: {len(good)}  failed: {len(failed)}")
    for failure in failed[:3]:
        print(f"  failure: {failure.error}")
    print(f"duration: {elapsed:.2f} s")
    print(f"request throughput: {len(good) / elapsed:.2f} req/s")
    print(f"output token throughput: {serving_tps:.1f} tok/s")
    for name, stats in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        print(
            f"{name} (ms): mean {stats['mean']:.1f}  p50 {stats['p50']:.1f}  "
            f"p90 {stats['p90']:.1f}  p99 {stats['p99']:.1f}"
        )
    if not args.skip_offline:
        offline_runs.append(
            offline_throughput(args.model, prompts, args.max_tokens, args.threads, max_num_seqs)
        )
        offline_tps = statistics.fmean(offline_runs)
        runs = ", ".join(f"{r:.1f}" for r in offline_runs)
        print(
            f"offline engine throughput (same prompts, before/after): {runs} -> mean {offline_tps:.1f} tok/s"
        )
        print(f"HTTP serving / offline engine: {serving_tps / offline_tps:.1%}")


if __name__ == "__main__":
    main()
