"""TTFT and throughput of the engine's scheduling at a fixed concurrency, on a clock that does not
depend on how busy the machine is: the engine process's CPU time.

A closed loop like ``servekit bench --concurrency C``: ``--requests`` random prompts of
``--input-len`` tokens, ``--output-len`` tokens each (greedy, EOS ignored), at most C in the engine at
once, a new one added as soon as one finishes. Every time is read from ``time.process_time()`` (all
of the process's threads), so a request's TTFT is the CPU the engine spent between its arrival and
its first token: the figure a quiet machine with the same threads would show in wall time, up to
the threads' parallel efficiency. Each ``--budgets`` value (tokens per step,
``max_num_batched_tokens``) runs with each ``--caps`` value (``prefill_tokens_per_step``), in turn
on the same prompts.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_schedule.py \
        [--threads 1] [--concurrency 32] [--requests 64] [--budgets 2048] [--caps 0,256]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time

import torch

from servekit.cpu import cpu_model
from servekit.llm import EngineConfig, LLMEngine, SamplingParams


def run(budget: int, cap: int, args: argparse.Namespace) -> dict[str, float]:
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            max_num_seqs=args.concurrency,
            max_num_batched_tokens=budget,
            prefill_tokens_per_step=cap,
        )
    )
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    arrival: dict[str, float] = {}
    ttft: dict[str, float] = {}
    done = 0
    added = 0
    start = time.process_time()

    def add() -> None:
        nonlocal added
        request_id = str(added)
        arrival[request_id] = time.process_time()
        engine.add_request(request_id, prompt_token_ids=prompts[added], params=params)
        added += 1

    while added < min(args.concurrency, args.requests):
        add()
    steps = 0
    while done < args.requests:
        outputs = engine.step()
        steps += 1
        now = time.process_time()
        for output in outputs:
            if output.request_id not in ttft and output.outputs[0].token_ids:
                ttft[output.request_id] = now - arrival[output.request_id]
            if output.finished:
                done += 1
                if added < args.requests:
                    add()
    total = time.process_time() - start
    values = sorted(ttft.values())
    return {
        "ttft_p50": statistics.median(values),
        "ttft_p90": values[int(0.9 * (len(values) - 1))],
        "tok_per_cpu_s": args.requests * args.output_len / total,
        "cpu_s": total,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: servekit's default model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[2048])
    parser.add_argument(
        "--caps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 256],
        help="prefill_tokens_per_step values (0: no cap), each run with each budget",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_model()}; {args.threads} threads; load average {os.getloadavg()[0]:.1f}; "
        f"c={args.concurrency}, {args.requests} requests, {args.input_len}/{args.output_len} tokens"
    )
    print(
        "| tokens per step | prompt tokens per step | TTFT p50 (CPU s) | TTFT p90 (CPU s) "
        "| output tok per CPU s | steps |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        for cap in args.caps:
            result = run(budget, cap, args)
            print(
                f"| {budget} | {cap or '-'} | {result['ttft_p50']:.2f} | {result['ttft_p90']:.2f} | "
                f"{result['tok_per_cpu_s']:.2f} | {result['steps']} |",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
