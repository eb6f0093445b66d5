"""The default model on its GGUF blocks against the same model dequantised to float32, same run.

SmolLM2-135M-Instruct (Q4_1 projections, Q8_0 tied embeddings/LM head) through ``ModelRunner``:
decode tok/s at batch 1 and 8 (one step = one token per sequence, contexts of ~32 tokens), and
prefill tok/s of one 128-token prompt; each measured ``--repeats`` times, interleaved (blocks,
dequantised, blocks, ...), best of the repeats; the ratio is blocks / dequantised.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/bench_quantized.py [--threads 2] [--steps 32] [--repeats 3]

(``servekit`` sets that wait policy for its own processes; see ``bench_contention.py``.)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from servekit.cpu import cpu_model
from servekit.llm.kernels.quantized import quantized_simd_lanes
from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner

TEXT = "Paged attention stores the keys and values of every sequence in fixed-size blocks. " * 24


def build(source: ModelSource, blocks: bool) -> ModelRunner:
    weights = source.iter_weight_blocks() if blocks else source.iter_weights()
    return ModelRunner(source.config, weights, num_blocks=160, block_size=16, max_model_len=1024)


def decode_rate(runner: ModelRunner, prompt: list[int], batch: int, steps: int) -> float:
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(batch)]
    runner.execute(ForwardBatch([prompt] * batch, [0] * batch, tables))
    start = time.perf_counter()
    for step in range(steps):
        runner.execute(ForwardBatch([[1]] * batch, [len(prompt) + step] * batch, tables))
    return batch * steps / (time.perf_counter() - start)


def prefill_rate(runner: ModelRunner, prompt: list[int]) -> float:
    start = time.perf_counter()
    runner.execute(ForwardBatch([prompt], [0], [list(range(16))]))
    return len(prompt) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as handle:
        load = handle.read().strip()
    print(
        f"CPU: {cpu_model()}, quantised kernels' vector lanes {quantized_simd_lanes()}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    print(f"load average: {load}")
    source = load_model_source(None)
    ids = source.tokenizer.encode(TEXT, add_special_tokens=False)
    short, long = ids[:32], ids[:128]
    runners = {"blocks": build(source, True), "dequantised": build(source, False)}
    measures: dict[str, Callable[[ModelRunner], float]] = {
        "decode batch 1": lambda r: decode_rate(r, short, 1, args.steps),
        "decode batch 8": lambda r: decode_rate(r, short, 8, args.steps),
        "prefill 128": lambda r: prefill_rate(r, long),
    }
    for name, measure in measures.items():
        best = dict.fromkeys(runners, 0.0)
        with torch.no_grad():
            for _ in range(args.repeats):
                for mode, runner in runners.items():
                    best[mode] = max(best[mode], measure(runner))
        print(
            f"{name:15s} blocks {best['blocks']:7.1f} tok/s  dequantised {best['dequantised']:7.1f} tok/s  "
            f"ratio {best['blocks'] / best['dequantised']:.2f}",
            flush=True,
        )
    with open("/proc/loadavg") as handle:
        print(f"load average after: {handle.read().strip()}")


if __name__ == "__main__":
    main()
