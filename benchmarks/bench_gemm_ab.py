"""The GEMM on GGUF's blocks (``quantized_gemm.c``), this tree against another git ref, side by side.

Both libraries are built here from their own sources with the loader's flags (into a temporary
directory), then each shape is timed with both, interleaved: 1 thread, thread CPU time, best of
``--repeats``, so another process on the machine costs wall time but not these figures. The outputs of
the two libraries are compared with ``torch.equal`` (bit-identical or not, per shape and row count).

Shapes: SmolLM2-135M's projections (q/k/v 960 x 576, o 576 x 576, gate_up 3072 x 576, down 576 x 1536,
Q4_1) and its LM head (49152 x 576, Q8_0), with random weights quantised by ``gguf``.

    PYTHONPATH=src:. python benchmarks/bench_gemm_ab.py --baseline main --rows 16,32,33,48,64,159
    PYTHONPATH=src:. python benchmarks/bench_gemm_ab.py --cflags=-mno-avx512f  # the AVX2 path
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from kernel_build import build_library, kernel_sources

from servekit.llm.kernels.quantized import MatmulCall

FUNCTIONS = ("quantized_gemm",)
SHAPES = {  # name: (N, K, GGML type)
    "qkv": (960, 576, 3),
    "o": (576, 576, 3),
    "gate_up": (3072, 576, 3),
    "down": (576, 1536, 3),
    "lm_head": (49152, 576, 8),
}


def weights(n: int, k: int, ggml_type: int, seed: int) -> torch.Tensor:
    import gguf

    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType(ggml_type)))


def cpu_seconds(call: Callable[[], object], inner: int) -> float:
    start = time.thread_time()
    for _ in range(inner):
        call()
    return (time.thread_time() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="main", help="git ref of the old library (default main)")
    parser.add_argument("--rows", default="16,32,33,48,64,159")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--cflags", default="", help="extra compiler flags for both, e.g. -mno-avx512f (the AVX2 path)"
    )
    parser.add_argument("--peak", type=float, default=0.0, help="GFLOP/s of a core, to print a share of")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        extra = tuple(args.cflags.split())
        old = build_library(kernel_sources(args.baseline), Path(scratch) / "old.so", FUNCTIONS, extra)
        new = build_library(kernel_sources(), Path(scratch) / "new.so", FUNCTIONS, extra)
        print(
            f"# baseline {args.baseline} {args.cflags}; load {Path('/proc/loadavg').read_text().split()[:3]}"
        )
        print("rows shape      old_ms   new_ms  ratio  new_GF/s  share  equal")
        totals: dict[int, list[float]] = {}
        for rows in (int(r) for r in args.rows.split(",")):
            for name in args.shapes.split(","):
                n, k, ggml_type = SHAPES[name]
                blocks = weights(n, k, ggml_type, seed=n + k)
                x = torch.randn(rows, k)
                calls = [MatmulCall.of(x, blocks, ggml_type, None, 1) for _ in (old, new)]
                runs = [
                    functools.partial(calls[0].run, old.quantized_gemm),
                    functools.partial(calls[1].run, new.quantized_gemm),
                ]
                flops = 2.0 * rows * n * k
                inner = max(1, int(2e8 / flops))  # ~a few ms a sample
                best = [float("inf"), float("inf")]
                for _ in range(args.repeats):
                    for side in (0, 1):
                        best[side] = min(best[side], cpu_seconds(runs[side], inner))
                equal = torch.equal(calls[0].out, calls[1].out)
                gflops = flops / best[1] / 1e9
                share = f"{gflops / args.peak:5.0%}" if args.peak else "    -"
                print(
                    f"{rows:4d} {name:8s} {best[0] * 1e3:8.3f} {best[1] * 1e3:8.3f} {best[0] / best[1]:6.2f}"
                    f" {gflops:9.1f}  {share}  {equal}"
                )
                if name != "lm_head":
                    totals.setdefault(rows, [0.0, 0.0])
                    totals[rows][0] += best[0]
                    totals[rows][1] += best[1]
        for rows, (before, after) in totals.items():
            print(f"{rows:4d} projections {before * 1e3:8.3f} {after * 1e3:8.3f} {before / after:6.2f}")


if __name__ == "__main__":
    main()
