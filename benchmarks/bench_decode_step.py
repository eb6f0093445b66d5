"""A decode step of the default model at several batch sizes: the native calls (``decode_step.c``)
against the model's PyTorch forward, each in fresh processes, interleaved.

Every sequence has a ``--context``-token prompt in its own blocks; the step decodes one token for each
(``ModelRunner.execute``, no engine around it), the median over ``--steps`` steps, wall time. The
processes run as ``servekit serve`` runs the engine: ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets a policy or ``GOMP_SPINCOUNT``, torch's threads at ``--threads``, freed memory kept
in the C heap (``servekit.host_memory``).

    PYTHONPATH=src:. .venv/bin/python benchmarks/bench_decode_step.py [--threads 2] [--batch 1,8,32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(batches: list[int], context: int, steps: int, threads: int, native: bool) -> dict[int, float]:
    import torch

    from servekit.host_memory import keep_freed_memory
    from servekit.llm.loaders import load_model_source
    from servekit.llm.model_runner import ForwardBatch, ModelRunner

    keep_freed_memory()
    torch.set_num_threads(threads)
    source = load_model_source(None)
    block_size = 16
    blocks_each = (context + steps) // block_size + 1
    largest = max(batches)
    runner = ModelRunner(
        source.config,
        source.iter_weight_blocks(),
        block_size=block_size,
        num_blocks=largest * blocks_each,
        max_model_len=context + steps + 1,
    )
    if not native:
        runner.native_decode = None
    tables = [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(largest)]
    for i in range(largest):  # (prefill one by one: the same prompts for every batch size)
        runner.execute(ForwardBatch([[(7 * i + j) % 1000 + 1 for j in range(context)]], [0], [tables[i]]))
    medians: dict[int, float] = {}
    with torch.no_grad():
        for batch in batches:
            times = []
            for step in range(steps):
                positions = [context + step] * batch
                started = time.perf_counter()
                runner.execute(ForwardBatch([[11]] * batch, positions, tables[:batch]))
                times.append(time.perf_counter() - started)
            medians[batch] = statistics.median(times[1:]) * 1e3  # (the first step warms the scratch)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=("native", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.child:
        print(json.dumps(child(batches, args.context, args.steps, args.threads, args.child == "native")))
        return
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # (servekit's default; set before torch loads libgomp)
    results: dict[str, list[dict[int, float]]] = {"native": [], "torch": []}
    for repeat in range(args.repeats):
        for mode in ("native", "torch"):
            with open("/proc/loadavg") as handle:
                load = handle.read().split()[0]
            command = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=900)
            got = {int(k): v for k, v in json.loads(output.stdout.strip().splitlines()[-1]).items()}
            results[mode].append(got)
            print(
                f"# run {repeat + 1}/{args.repeats} {mode}, load {load}: "
                + ", ".join(f"b{b} {got[b]:.1f} ms" for b in batches)
            )
    print(f"\nmedian ms per decode step, context {args.context}, {args.threads} threads\n")
    print("| batch | native | PyTorch path | native / PyTorch |\n|---:|---:|---:|---:|")
    for b in batches:
        native = statistics.median(r[b] for r in results["native"])
        torch_path = statistics.median(r[b] for r in results["torch"])
        print(f"| {b} | {native:.1f} | {torch_path:.1f} | {native / torch_path:.2f}x |")


if __name__ == "__main__":
    main()
