"""Decode attention over the paged KV cache: the C kernel's vector path against its portable loop.

Both are the same source, compiled twice in this run: once as servekit builds it (``-march=native``:
AVX-512 or AVX2 + FMA + F16C, whichever this CPU has) and once with the vector extensions switched
off (the loop CPUs without them run). Same inputs, same thread count, alternating, best of N.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import tempfile
import time
from pathlib import Path

import torch
from kernel_build import build_library, kernel_sources

from servekit.cpu import cpu_flags, cpu_model
from servekit.llm.kernels import attention_simd_lanes

PORTABLE_FLAGS = ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")


def case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int = 16) -> tuple:
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(num_blocks, 2, kv_heads, block_size, head_dim)
    tables = torch.randperm(num_blocks, dtype=torch.int32).reshape(batch, blocks_per_seq).contiguous()
    lengths = torch.full((batch,), context, dtype=torch.int32)
    query = torch.randn(batch, heads, head_dim)
    out = torch.empty_like(query)
    return query, cache, tables, lengths, out, blocks_per_seq


def run(library: ctypes.CDLL, inputs: tuple, heads: int, kv_heads: int, head_dim: int, threads: int) -> None:
    query, cache, tables, lengths, out, max_blocks = inputs
    status = library.paged_decode_attention(
        query.data_ptr(), cache.data_ptr(), tables.data_ptr(), lengths.data_ptr(), out.data_ptr(),
        query.shape[0], heads, kv_heads, head_dim, 16, max_blocks, 0, 0, 0, head_dim**-0.5, threads,
    )  # fmt: skip
    assert status == 0


def best_time(fn, repeats: int, calls: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from servekit.llm.kernels import load_library

    native = load_library()
    if native is None:
        raise SystemExit("servekit's kernels are not available here")
    wanted = ("avx512f", "avx512_vnni", "amx_tile", "avx2", "fma", "f16c")
    print(
        f"CPU: {cpu_model()}; flags: {' '.join(f for f in wanted if f in cpu_flags())}; threads {args.threads}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        portable = build_library(
            kernel_sources(),
            Path(scratch) / "portable.so",
            ("paged_decode_attention", "attention_simd_lanes"),
            PORTABLE_FLAGS,
        )
        print(
            f"native build: {attention_simd_lanes()} lanes; portable build: {portable.attention_simd_lanes()}"
        )
        heads, kv_heads, head_dim = 9, 3, 64  # SmolLM2-135M
        print("batch context  portable ms  native ms  speed-up")
        for batch, context in ((1, 128), (1, 1024), (8, 256), (32, 256), (32, 1024)):
            inputs = case(batch, context, heads, kv_heads, head_dim)
            calls = max(3, 2000 // (batch * context // 64))
            times = {}
            for _ in range(2):  # alternate the two builds
                for name, library in (("portable", portable), ("native", native)):
                    call = functools.partial(run, library, inputs, heads, kv_heads, head_dim, args.threads)
                    t = best_time(call, args.repeats, calls)
                    times[name] = min(times.get(name, t), t)
            native_out = inputs[4].clone()
            run(portable, inputs, heads, kv_heads, head_dim, args.threads)
            torch.testing.assert_close(native_out, inputs[4], atol=1e-5, rtol=0)  # the same numbers
            print(f"{batch:5d} {context:7d} {times['portable'] * 1e3:12.3f} {times['native'] * 1e3:10.3f}"
                  f" {times['portable'] / times['native']:8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
