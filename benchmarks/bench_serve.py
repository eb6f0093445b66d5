"""Serving benchmark in the manner of ``vllm bench serve``: N prompts at concurrency C over HTTP.

Starts ``servekit serve`` on 127.0.0.1, streams ``/v1/completions`` requests (fixed output length,
``ignore_eos``), and reports TTFT, TPOT and ITL percentiles plus request and output-token
throughput; then runs the same prompts through the engine offline (``servekit.llm.LLM``) in the same
run and prints the ratio (serving and offline alternate ``--repeats`` times; medians are compared).
With ``--llamacpp-python``, also serves the same GGUF with llama.cpp's server (llama-cpp-python) and
runs the same load against it. Bounded: a fixed number of prompts and a per-request timeout.

    .venv/bin/python benchmarks/bench_serve.py --num-prompts 64 --concurrency 32 --max-tokens 64 \
        [--llamacpp-python /path/to/venv-with-llama-cpp-python/bin/python]
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
from typing import Any

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
    session: aiohttp.ClientSession,
    url: str,
    prompt: str,
    max_tokens: int,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> RequestResult:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
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
    base_url: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[list[RequestResult], float]:
    """aiohttp, as ``vllm bench serve`` uses: the load generator shares the server's 2 cores here,
    so a light client matters (httpx cost about twice the CPU per streamed token)."""
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def limited(index: int, prompt: str) -> RequestResult:
            async with semaphore:
                return await one_request(
                    session, f"{base_url}/v1/completions", prompt, max_tokens, index, extra
                )

        # Warm-up: one request, so the first measured request does not pay one-time costs.
        await one_request(session, f"{base_url}/v1/completions", "warm up", 4, 0, extra)
        started = time.perf_counter()
        results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
        return list(results), time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model: str | None, port: int, threads: int, max_num_seqs: int, quantization: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "SERVEKIT_NUM_THREADS": str(threads),
        "SERVEKIT_LOG_LEVEL": "warning",
        "SERVEKIT_DISABLE_LOG_REQUESTS": "true",
    }
    args = [sys.executable, "-m", "servekit.cli", "serve", *([model] if model else [])]
    args += ["--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    args += ["--quantization", quantization]
    return subprocess.Popen(args, env=env, start_new_session=True)


def start_llamacpp(python: str, gguf: str, port: int, threads: int) -> subprocess.Popen[bytes]:
    """llama-cpp-python's OpenAI server on the same GGUF (it serves one request at a time; without
    ``--interrupt_requests False`` a waiting request would cut the running stream short)."""
    args = [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)]
    args += ["--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    args += ["--interrupt_requests", "False", "--verbose", "False"]
    return subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], timeout: float = 180, path: str = "/health"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during startup")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not healthy in time")


def offline_throughput(
    model: str | None, prompts: list[str], max_tokens: int, threads: int, max_num_seqs: int, quantization: str
) -> float:
    sys.path.insert(0, str(REPO / "src"))
    from servekit.llm import LLM, SamplingParams

    llm = LLM(model, num_threads=threads, max_num_seqs=max_num_seqs, quantization=quantization)
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


def report(label: str, results: list[RequestResult], elapsed: float) -> float:
    """Print the run's figures; returns its output token throughput."""
    good = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttft = percentiles([r.ttft * 1000 for r in good])
    tpot = percentiles(
        [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in good if r.output_tokens > 1]
    )
    itl = percentiles([x * 1000 for r in good for x in r.itls])
    throughput = tokens / elapsed
    print(f"--- {label}")
    print(f"successful requests: {len(good)}  failed: {len(failed)}  output tokens: {tokens}")
    for failure in failed[:3]:
        print(f"  failure: {failure.error}")
    print(f"duration: {elapsed:.2f} s")
    print(f"request throughput: {len(good) / elapsed:.2f} req/s")
    print(f"output token throughput: {throughput:.1f} tok/s")
    for name, stats in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        print(
            f"{name} (ms): mean {stats['mean']:.1f}  p50 {stats['p50']:.1f}  "
            f"p90 {stats['p90']:.1f}  p99 {stats['p99']:.1f}"
        )
    return throughput


def serve_and_load(
    process: subprocess.Popen[bytes],
    url: str,
    args: argparse.Namespace,
    prompts: list[str],
    health_path: str = "/health",
    extra: dict[str, Any] | None = None,
) -> tuple[list[RequestResult], float]:
    try:
        wait_healthy(url, process, path=health_path)
        return asyncio.run(run_load(url, prompts, args.concurrency, args.max_tokens, extra))
    finally:
        stop(process)


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
    parser.add_argument("--repeats", type=int, default=3, help="alternating offline/serving runs")
    parser.add_argument(
        "--quantization", default="none", help="engine quantization, offline and served: none, int8, auto"
    )
    parser.add_argument(
        "--llamacpp-python",
        default=None,
        help="a Python with llama-cpp-python[server]: also serve the same GGUF with llama.cpp and compare",
    )
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts)
    max_num_seqs = max(args.concurrency, 1)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (default)'}  quantization: {args.quantization}")
    print(
        f"prompts: {args.num_prompts}  concurrency: {args.concurrency}  output tokens/request: {args.max_tokens}"
    )

    # Serving and offline alternate --repeats times (fresh server, fresh engine each time); the
    # medians are compared, since a shared 2-core machine moves single runs by 10-20%.
    serving_runs: list[float] = []
    offline_runs: list[float] = []
    for repeat in range(args.repeats):
        if not args.skip_offline:
            offline_runs.append(
                offline_throughput(
                    args.model, prompts, args.max_tokens, args.threads, max_num_seqs, args.quantization
                )
            )
            print(f"--- offline engine, run {repeat + 1}: {offline_runs[-1]:.1f} tok/s")
        if args.url is not None:
            results, elapsed = asyncio.run(run_load(args.url, prompts, args.concurrency, args.max_tokens))
        else:
            port = free_port()
            process = start_server(args.model, port, args.threads, max_num_seqs, args.quantization)
            results, elapsed = serve_and_load(process, f"http://127.0.0.1:{port}", args, prompts)
        serving_runs.append(report(f"servekit serve, run {repeat + 1}", results, elapsed))
    serving_tps = statistics.median(serving_runs)
    print(
        f"=== servekit serve: median {serving_tps:.1f} tok/s of {', '.join(f'{r:.1f}' for r in serving_runs)}"
    )
    if offline_runs:
        offline_tps = statistics.median(offline_runs)
        print(
            f"=== offline engine: median {offline_tps:.1f} tok/s of {', '.join(f'{r:.1f}' for r in offline_runs)}"
        )
        print(f"=== HTTP serving / offline engine (medians): {serving_tps / offline_tps:.1%}")
    if args.llamacpp_python:
        sys.path.insert(0, str(REPO / "src"))
        from servekit.llm.loaders import default_model_path, load_model_source

        gguf = args.model or default_model_path()
        eos = load_model_source(gguf).tokenizer.eos_token_ids
        port = free_port()
        process = start_llamacpp(args.llamacpp_python, gguf, port, args.threads)
        # llama.cpp has no ignore_eos: ban the end-of-sequence tokens so every reply is full length.
        ban_eos = {"logit_bias": {str(token): -100.0 for token in eos}}
        results, elapsed = serve_and_load(
            process, f"http://127.0.0.1:{port}", args, prompts, health_path="/v1/models", extra=ban_eos
        )
        llamacpp_tps = report("llama.cpp server (llama-cpp-python)", results, elapsed)
        print(f"=== servekit serve (median) / llama.cpp server: {serving_tps / llamacpp_tps:.2f}x")


if __name__ == "__main__":
    main()
