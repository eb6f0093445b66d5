"""Decode step time of the default model (one sequence, or ``--batch``) alone and with CPU-bound
neighbour processes.

Each setting runs in a fresh process (the OpenMP wait policy is read once, when libgomp starts):
the step time (median of ``--steps`` decode steps of one sequence or of ``--batch`` together,
SmolLM2-135M-Instruct GGUF on its blocks) alone, then with 1 and 2 neighbours running ``while True:
pass``, and the ratio to alone. With N cores and k neighbours a fair share is N / (N + k) of the
CPU, so a step may take up to (N + k) / N times as long; more than that is collapse (threads
spinning at barriers while a neighbour holds the core their partner needs).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_contention.py [--steps 60] [--policies default,passive] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {
    # libgomp's own default: spin ~300k iterations at a barrier, then sleep (OMP_WAIT_POLICY unset)
    "default": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},  # spin briefly (~microseconds), then sleep
}

CHILD = r"""
import json, statistics, sys, time
import torch
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.threads import configure_threads
threads = configure_threads(None)
steps, batch = int(sys.argv[1]), int(sys.argv[2])
source = load_model_source(None)
runner = ModelRunner(
    source.config, source.iter_weight_blocks(), num_blocks=8 * batch, block_size=16, max_model_len=512
)
prompt = source.tokenizer.encode("The capital of France is")
tables = [list(range(8 * i, 8 * i + 8)) for i in range(batch)]
for table in tables:
    runner.execute(ForwardBatch([prompt], [0], [table]))
print("ready", flush=True)
sys.stdin.readline()
times, position = [], len(prompt)
for step in range(steps):
    start = time.perf_counter()
    runner.execute(ForwardBatch([[1]] * batch, [position] * batch, tables))
    times.append(time.perf_counter() - start)
    position += 1
print(json.dumps({"median_ms": statistics.median(times) * 1e3, "threads": threads}), flush=True)
"""


def measure(policy: str, neighbours: int, steps: int, batch: int) -> dict[str, float]:
    env = {**os.environ, **POLICIES[policy]}
    env = {name: value for name, value in env.items() if value}  # "" = unset
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(steps), str(batch)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    busy: list[subprocess.Popen[bytes]] = []
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the measuring process failed to start")
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(neighbours)]
        time.sleep(0.5)  # let the neighbours get going (a benchmark, not a test)
        child.stdin.write("go\n")
        child.stdin.flush()
        result: dict[str, float] = json.loads(child.stdout.readline())
        child.wait(timeout=600)
        return result
    finally:
        for process in busy:
            process.kill()
            process.wait()
        if child.poll() is None:
            child.kill()
            child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--policies", default="default,passive")
    parser.add_argument("--max-neighbours", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    args = parser.parse_args()
    from servekit.cpu import cpu_model

    cores = len(os.sched_getaffinity(0))
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    print(f"CPU: {cpu_model()}, {cores} CPUs available; load average before: {' '.join(load)}", flush=True)
    for policy in args.policies.split(","):
        alone = None
        for neighbours in range(args.max_neighbours + 1):
            result = measure(policy, neighbours, args.steps, args.batch)
            alone = alone or result["median_ms"]
            fair = (cores + neighbours) / cores
            print(
                f"{policy:8s} batch {args.batch} threads {int(result['threads'])} neighbours {neighbours}: "
                f"{result['median_ms']:7.1f} ms/step  x{result['median_ms'] / alone:4.2f} of alone "
                f"(fair share allows x{fair:.2f})",
                flush=True,
            )
    with open("/proc/loadavg") as handle:
        print(f"load average after: {handle.read().strip()}")


if __name__ == "__main__":
    main()
