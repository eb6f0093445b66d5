"""Float32 projections one call at a time: oneDNN on its packed copy of the weight against the C
kernels reading the weight in place as GGML F32 rows (the row kernel and the GEMM), same run.

Best of ``--rounds`` interleaved rounds of repeated calls, ms. A tight loop of one call favours
oneDNN against what the engine sees (RESULTS.md, "Twelfth session": inside the engine's steps the
kernels win at these shapes); this is the per-call view.

    PYTHONPATH=src:. .venv/bin/python benchmarks/bench_float_linear.py [--threads 2] [--rounds 8]
        [SHAPE ...]   (SHAPE: ROWSxKxN, e.g. 32x256x1792)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from benchmarks.bench_families import machine

from servekit.llm.kernels.quantized import BoundWeight, QuantizedTensor

DEFAULT_SHAPES = ("1x768x2304", "2x768x2304", "6x768x2304", "32x256x1792", "32x1024x256", "512x768x2304")


def best_ms(call: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def measure(shape: str, rounds: int) -> dict[str, float]:
    """Best ms of each way for one ROWSxKxN shape, after checking both kernels' results."""
    rows, k, n = (int(part) for part in shape.split("x"))
    x, weight = torch.randn(rows, k), torch.randn(n, k)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    bound = BoundWeight(QuantizedTensor.of_float32(weight))
    expected = x.double() @ weight.double().T
    for run in (bound.rows, bound.gemm):
        error = float((run(x).double() - expected).abs().max() / expected.abs().max())
        if error > 1e-5:
            raise RuntimeError(f"{shape}: relative error {error:.1e}")
    calls: dict[str, Callable[[], object]] = {
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        "rows": lambda: bound.rows(x),
        "gemm": lambda: bound.gemm(x),
    }
    repeats = max(3, int(1e8 / (2 * rows * k * n)))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            best[name] = min(best[name], best_ms(call, repeats))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("shapes", nargs="*", default=list(DEFAULT_SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}; {args.threads} threads; best ms of {args.rounds} interleaved rounds\n")
    print("| rows x K x N | oneDNN packed | row kernel | GEMM |\n|---|---:|---:|---:|")
    for shape in args.shapes:
        best = measure(shape, args.rounds)
        print(f"| {shape} | {best['onednn']:.3f} | {best['rows']:.3f} | {best['gemm']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
