"""The engine's time outside the model forward (scheduler, sampler, output processing: Python) per
decode step, from the engine's own counters (``step_time_s`` and ``forward_time_s``, what
``servekit:engine_step_seconds_total`` and ``servekit:engine_forward_seconds_total`` export).

The default model (or ``--model``) with the engine's defaults; ``--batch`` sequences of 64-token
prompts are prefilled, then only their decode steps are counted (greedy, EOS ignored).
Goals (issue 14): under 5% of a decode step at batch 32, under 1 ms at batch 1.

    .venv/bin/python benchmarks/bench_step_overhead.py [--threads 2] [--batch 1,32] [--steps 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import torch

from servekit.cpu import cpu_model
from servekit.llm import EngineConfig, LLMEngine, SamplingParams


def decode_overhead(model: str | None, batch: int, steps: int) -> tuple[float, float]:
    """Milliseconds per decode step outside the forward, and the whole step."""
    engine = LLMEngine(EngineConfig(model=model, max_num_seqs=max(batch, 1)))
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for index in range(batch):
        engine.add_request(
            str(index), prompt_token_ids=[rng.randrange(vocab) for _ in range(64)], params=params
        )
    while any(output.outputs[0].token_ids == [] for output in engine.step()):
        pass  # prefill (possibly in chunks) until every sequence has its first token
    before = engine.get_stats()
    for _ in range(steps):
        engine.step()
    after = engine.get_stats()
    step = (after.step_time_s - before.step_time_s) / steps
    forward = (after.forward_time_s - before.forward_time_s) / steps
    return (step - forward) * 1e3, step * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: servekit's default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print("| batch | step ms | outside the forward ms | share |\n|---:|---:|---:|---:|")
    for batch in args.batch:
        outside, step = decode_overhead(args.model, batch, args.steps)
        print(f"| {batch} | {step:.2f} | {outside:.3f} | {outside / step:.1%} |", flush=True)


if __name__ == "__main__":
    main()
