"""Serving benchmark in the manner of ``vllm bench serve``: N prompts at concurrency C over HTTP.

Starts ``servekit serve`` on 127.0.0.1, streams ``/v1/completions`` requests (fixed output length,
``ignore_eos``) with ``servekit bench``'s load generator, and reports its TTFT, TPOT, ITL and e2e
percentiles plus request and output-token throughput; then runs the same prompts through the engine offline (``servekit.llm.LLM``) in the same
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
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PERCENTILES = (50.0, 90.0, 99.0)
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


def load_settings(base_url: str, max_tokens: int, concurrency: int, extra: dict[str, Any] | None) -> Any:
    from servekit.bench.runner import COMPLETIONS_ENDPOINT, LoadSettings, first_model

    return LoadSettings(
        base_url=base_url,
        endpoint=COMPLETIONS_ENDPOINT,
        model=asyncio.run(first_model(base_url, None, 60)),
        max_concurrency=concurrency,
        request_rate=float("inf"),
        burstiness=1.0,
        ignore_eos=True,
        temperature=0.8,
        seed=0,
        timeout=600,
        extra_body=extra or {},
    )


def run_load(
    base_url: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``servekit bench``'s load generator (aiohttp, as ``vllm bench serve`` uses: the load shares the
    server's 2 cores here, so a light client matters); one warm-up request first."""
    from servekit.bench import runner
    from servekit.bench.datasets import BenchPrompt
    from servekit.bench.report import summarize

    settings = load_settings(base_url, max_tokens, concurrency, extra)
    _, results, elapsed = asyncio.run(
        runner.run_load(settings, [BenchPrompt(p, max_tokens) for p in prompts], num_warmups=1)
    )
    return summarize(
        results,
        elapsed,
        PERCENTILES,
        {"model": settings.model, "max_concurrency": concurrency, "request_rate": "inf"},
    )


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


def report(label: str, summary: dict[str, Any]) -> float:
    """Print the run's figures (``servekit bench``'s report); returns its output token throughput."""
    from servekit.bench.report import format_report

    print(f"--- {label}")
    print(format_report(summary, PERCENTILES))
    return float(summary["output_throughput"])


def serve_and_load(
    process: subprocess.Popen[bytes],
    url: str,
    args: argparse.Namespace,
    prompts: list[str],
    health_path: str = "/health",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    try:
        wait_healthy(url, process, path=health_path)
        return run_load(url, prompts, args.concurrency, args.max_tokens, extra)
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
    sys.path.insert(0, str(REPO / "src"))  # servekit bench's load generator, from this checkout
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
            summary = run_load(args.url, prompts, args.concurrency, args.max_tokens)
        else:
            port = free_port()
            process = start_server(args.model, port, args.threads, max_num_seqs, args.quantization)
            summary = serve_and_load(process, f"http://127.0.0.1:{port}", args, prompts)
        serving_runs.append(report(f"servekit serve, run {repeat + 1}", summary))
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
        summary = serve_and_load(
            process, f"http://127.0.0.1:{port}", args, prompts, health_path="/v1/models", extra=ban_eos
        )
        llamacpp_tps = report("llama.cpp server (llama-cpp-python)", summary)
        print(f"=== servekit serve (median) / llama.cpp server: {serving_tps / llamacpp_tps:.2f}x")


if __name__ == "__main__":
    main()
