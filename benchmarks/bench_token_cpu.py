"""CPU time, context switches and syscalls per output token of ``servekit serve`` at concurrency 1.

Load-robust figures for the per-token work outside the model forward (issue 14): starts
``servekit serve`` (default model, ``--threads`` compute threads) on 127.0.0.1, streams
``--requests`` ``/v1/completions`` one at a time (a 128-word prompt, ``--max-tokens`` tokens, greedy,
``ignore_eos``) after one warm-up request, and reads ``/proc/PID/task/*/stat`` and
``/proc/PID/task/*/status`` of the front and worker processes before and after. Prints, per process
and per thread (grouped by thread name), the CPU milliseconds and the voluntary / involuntary context
switches per output token, and the client's TPOT p50 (wall time: on a loaded machine that figure is
the load's). The CPU figures include the prefill of each request (one 128-token prompt per
``--max-tokens`` output tokens).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_token_cpu.py [--requests 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import free_port, stop, wait_healthy
from llama_server import bench_env, default_gguf

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
WORDS = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
]


def thread_counters(pid: int) -> dict[str, list[float]]:
    """Thread name and id -> [CPU seconds, voluntary switches, involuntary switches, 1]."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended between the listing and the read
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        cpu = (int(rest[11]) + int(rest[12])) / CLOCK_TICK  # utime + stime
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        tid = int(task.name)
        row = totals[f"{name} (main)" if tid == pid else f"{name} {tid}"]
        row[0] += cpu
        row[1] += int(fields["voluntary_ctxt_switches"])
        row[2] += int(fields["nonvoluntary_ctxt_switches"])
        row[3] += 1
    return dict(totals)


def processes(root: int) -> dict[str, int]:
    """The front (the serve process) and its worker processes, by role."""
    found = {"front": root}
    for index, child in enumerate(psutil.Process(root).children(recursive=True)):
        found[f"worker{index}"] = child.pid
    return found


ENGINE_COUNTERS = (
    "servekit:engine_steps_total",
    "servekit:engine_step_seconds_total",
    "servekit:engine_forward_seconds_total",
)


def engine_counters(client: httpx.Client) -> dict[str, float]:
    """The engine's step count and its step and forward seconds, from ``/metrics``."""
    found: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in ENGINE_COUNTERS:
            found[name.split("{")[0]] = found.get(name.split("{")[0], 0.0) + float(value.split()[0])
    return found


def stream_one(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[int, list[float]]:
    """Tokens received and the arrival time of every chunk that carried text."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals: list[float] = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return len(arrivals), arrivals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--servekit-arg", action="append", default=[], help="extra `servekit serve` flag")
    args = parser.parse_args()

    port = free_port()
    command = [
        sys.executable, "-m", "servekit.cli", "serve", str(default_gguf()),
        "--host", "127.0.0.1", "--port", str(port), "--num-threads", str(args.threads),
        *args.servekit_arg,
    ]  # fmt: skip
    env = {**bench_env(), "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    prompts = [
        " ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(args.requests + 1)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=600)
        roles = processes(process.pid)
        with httpx.Client(base_url=url, timeout=600) as client:
            stream_one(client, prompts[0], args.max_tokens)  # warm-up
            before = {role: thread_counters(pid) for role, pid in roles.items()}
            engine_before = engine_counters(client)
            tokens = 0
            gaps: list[float] = []
            started = time.perf_counter()
            for prompt in prompts[1:]:
                count, arrivals = stream_one(client, prompt, args.max_tokens)
                tokens += count
                gaps += [b - a for a, b in itertools.pairwise(arrivals)]
            wall = time.perf_counter() - started
            after = {role: thread_counters(pid) for role, pid in roles.items()}
            engine_after = engine_counters(client)
    finally:
        stop(process)

    print(f"load average {os.getloadavg()[0]:.1f}; {tokens} tokens in {wall:.1f} s wall")
    deciles = statistics.quantiles(gaps, n=10)
    print(
        f"client inter-token gap (wall): p10 {deciles[0] * 1e3:.2f} ms, p50 {statistics.median(gaps) * 1e3:.2f}, "
        f"p90 {deciles[-1] * 1e3:.2f}, mean {statistics.fmean(gaps) * 1e3:.2f}"
    )
    steps, step_s, forward_s = (engine_after[k] - engine_before.get(k, 0.0) for k in ENGINE_COUNTERS)
    if steps:
        print(
            f"engine: {steps:.0f} steps, {step_s / steps * 1e3:.2f} ms a step (wall), of which "
            f"{forward_s / steps * 1e3:.2f} ms forward; wall per token {wall / tokens * 1e3:.2f} ms"
        )
    print("| process | thread | threads | CPU ms/token | voluntary cs/token | involuntary cs/token |")
    print("|---|---|---:|---:|---:|---:|")
    for role, threads in after.items():
        total = [0.0, 0.0, 0.0]
        for name, row in sorted(threads.items()):
            old = before[role].get(name, [0.0, 0.0, 0.0, 0.0])
            delta = [(row[i] - old[i]) / tokens for i in range(3)]
            total = [t + d for t, d in zip(total, delta, strict=True)]
            if delta[0] > 0.005 or delta[1] > 0.05:
                print(
                    f"| {role} | {name} | {int(row[3])} | {delta[0] * 1e3:.3f} | {delta[1]:.2f} | {delta[2]:.2f} |"
                )
        print(f"| {role} | **all** | | **{total[0] * 1e3:.3f}** | {total[1]:.2f} | {total[2]:.2f} |")


if __name__ == "__main__":
    main()
