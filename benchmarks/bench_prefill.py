"""Prompt processing only: servekit serve against llama-server, same GGUF, same client, same run.

Each server (started as ``bench_llama_server.py`` starts it) gets ``--singles`` lone prompts of
``--prompt-len`` random token ids, then a burst of ``--burst`` such prompts sent together; every
request is ``/v1/completions`` with ``max_tokens`` 1 and no prefix reuse possible (distinct random
ids), so the time is prefill. Reported: prompt tok/s of the lone prompts (best; client-side, first
token included), and of the burst (its tokens over its wall time) with its TTFT p50. The servers
alternate ``--repeats`` times.

    .venv/bin/python benchmarks/bench_prefill.py --llama-server PATH [--threads 2] [--burst 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_llama_server import server, server_arguments  # noqa: E402
from llama_server import default_gguf  # noqa: E402


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(length)]


def complete(url: str, model: str, tokens: list[int]) -> float:
    """Seconds until the one-token completion of ``tokens`` is back."""
    start = time.perf_counter()
    body = {"model": model, "prompt": tokens, "max_tokens": 1, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - start


def measure(url: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    complete(url, model, prompt(seed, 8))  # warm-up
    singles = [complete(url, model, prompt(seed + 1 + i, args.prompt_len)) for i in range(args.singles)]
    prompts = [prompt(seed + 1000 + i, args.prompt_len) for i in range(args.burst)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.burst) as pool:
        latencies = list(pool.map(lambda p: complete(url, model, p), prompts))
    wall = time.perf_counter() - start
    return {
        "single_prompt_tok_s": args.prompt_len / min(singles),
        "burst_prompt_tok_s": args.burst * args.prompt_len / wall,
        "burst_ttft_p50_s": statistics.median(latencies),
    }


def main() -> None:
    parser = server_arguments(__doc__)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    # What bench_llama_server's command builders read, for prompts of this length and no prefix.
    args.prefix_len, args.input_len, args.output_len = 0, args.prompt_len, 1
    gguf = args.model or default_gguf()
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for kind in ("servekit", "llama-server"):
                load = os.getloadavg()[0]
                with server(kind, gguf, args, args.burst, Path(scratch) / f"{kind}-{repeat}.log") as url:
                    figures = measure(url, args, seed=repeat * 10_000)
                after = os.getloadavg()[0]
                print(
                    f"{kind} (run {repeat + 1}, load average {load:.1f} -> {after:.1f}): {figures}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
