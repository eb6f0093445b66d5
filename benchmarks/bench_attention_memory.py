"""Decode attention over a realistic paged cache: old kernel against new, both built in this run.

Each "step" calls the decode-attention kernel once per layer over 30 distinct layers' caches (as a
token-forward of SmolLM2-135M does: 9 query heads, 3 KV heads, head dim 64, float32 cache, block
size 16), with block tables shuffled over a cache larger than the batch needs (as the engine's are
after some churn), so every key and value row comes from memory, not from a cache level. Two
shapes: 32 sequences at contexts 128-256 (concurrency 32) and 1 sequence at 1000 (batch 1).

The old library is `paged_attention.c` as committed at ``--old`` (default ``main``), the new one
the working tree's; both are compiled here with servekit's flags (``--portable`` / ``--avx2``:
with the vector extensions, or AVX-512 only, switched off). Timing is thread CPU time
(``time.thread_time``: other processes share the machine; with ``--threads`` above 1 wall time, or
with ``--cpu`` the process's CPU time, all threads, under ``OMP_WAIT_POLICY=PASSIVE``),
the two libraries interleaved, best of
``--repeats`` pairs, and every pair's ratio is kept so the spread can be reported; the outputs of
the two are compared (bit-identical or the largest relative difference).

    OMP_NUM_THREADS=1 PYTHONPATH=src:. .venv/bin/python benchmarks/bench_attention_memory.py
"""

from __future__ import annotations

import argparse
import ctypes
import random
import tempfile
import time
from pathlib import Path

import torch
from kernel_build import build_library, kernel_sources

from servekit.cpu import cpu_model

FUNCTIONS = ("paged_decode_attention", "attention_simd_lanes")
NO_AVX512 = ("-mno-avx512f",)
PORTABLE = ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


class Case:
    """30 layers' caches, one shuffled block table per sequence shared by the layers (as the engine's)."""

    def __init__(self, lengths: list[int], seed: int, hot: bool = False, huge: bool = False) -> None:
        rng = random.Random(seed)
        self.lengths = torch.tensor(lengths, dtype=torch.int32)
        per_seq = [-(-n // BLOCK) for n in lengths]
        self.max_blocks = max(per_seq)
        num_blocks = sum(per_seq) * 3 // 2  # spare blocks: the free list after churn
        order = list(range(num_blocks))
        rng.shuffle(order)
        tables = torch.zeros((len(lengths), self.max_blocks), dtype=torch.int32)
        for s, count in enumerate(per_seq):
            tables[s, :count] = torch.tensor([order.pop() for _ in range(count)], dtype=torch.int32)
        self.tables = tables
        generator = torch.Generator().manual_seed(seed)
        self.caches = []
        for _ in range(1 if hot else LAYERS):
            cache = torch.empty((num_blocks, 2, KV_HEADS, BLOCK, HEAD_DIM))
            if huge:
                advise_huge_pages(cache)
            self.caches.append(cache.normal_(generator=generator))
        self.caches *= LAYERS if hot else 1
        self.queries = [
            torch.randn((len(lengths), HEADS, HEAD_DIM), generator=generator) for _ in range(LAYERS)
        ]
        self.process_clock = False
        self.keys = sum(lengths) * KV_HEADS * LAYERS  # (key, KV head) pairs a step
        self.bytes = sum(lengths) * 2 * KV_HEADS * HEAD_DIM * 4 * LAYERS  # key + value rows read

    def step(self, library: ctypes.CDLL, outs: list[torch.Tensor], threads: int) -> float:
        """Seconds of one pass over the 30 layers: the thread's CPU time; above 1 thread wall time,
        or the process's CPU time (all threads: run with OMP_WAIT_POLICY=PASSIVE, so waiting is not work)."""
        clock = (
            time.thread_time
            if threads == 1
            else time.process_time
            if self.process_clock
            else time.perf_counter
        )
        start = clock()
        for layer in range(LAYERS):
            status = library.paged_decode_attention(
                self.queries[layer].data_ptr(), self.caches[layer].data_ptr(), self.tables.data_ptr(),
                self.lengths.data_ptr(), outs[layer].data_ptr(), len(self.lengths), HEADS, KV_HEADS,
                HEAD_DIM, BLOCK, self.max_blocks, 0, 0, 0, HEAD_DIM**-0.5, threads,
            )  # fmt: skip
            assert status == 0
        return clock() - start


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_HUGEPAGE) over the 2 MiB pages inside `tensor`, before it is first touched."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = -(-tensor.data_ptr() // (2 << 20)) * (2 << 20)
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // (2 << 20) * (2 << 20)
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    if all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        return "bit-identical"
    worst = max(float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()) for x, y in zip(a, b, strict=True))
    absolute = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    return f"differ: max abs {absolute:.2e}, max rel {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", default="main", help="git revision of the old kernel")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="kernel threads (above 1, wall time)")
    parser.add_argument("--cpu", action="store_true", help="above 1 thread, process CPU time, not wall")
    parser.add_argument("--avx2", action="store_true", help="build both without AVX-512")
    parser.add_argument("--portable", action="store_true", help="build both without vector extensions")
    parser.add_argument("--hot", action="store_true", help="one cache for all layers (cache-resident)")
    parser.add_argument("--huge-pages", action="store_true", help="madvise the caches MADV_HUGEPAGE")
    parser.add_argument("-D", dest="defines", action="append", default=[], help="extra -D for the new build")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = PORTABLE if args.portable else NO_AVX512 if args.avx2 else ()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        old = build_library(kernel_sources(args.old), directory / "old.so", FUNCTIONS, extra)
        defines = tuple(f"-D{d}" for d in args.defines)
        new = build_library(kernel_sources(), directory / "new.so", FUNCTIONS, (*extra, *defines))
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
        print(f"CPU: {cpu_model()}; lanes old {old.attention_simd_lanes()} new {new.attention_simd_lanes()};")
        print(
            f"threads {args.threads}; load average {' '.join(loadavg)}; old = {args.old}, new = working tree"
        )
        rng = random.Random(7)
        shapes = {
            "32 seqs, ctx 128-256": [rng.randint(128, 256) for _ in range(32)],
            "1 seq, ctx 1000": [1000],
        }
        for label, lengths in shapes.items():
            case = Case(lengths, seed=len(lengths), hot=args.hot, huge=args.huge_pages)
            case.process_clock = args.cpu
            outs = {
                name: [torch.empty(len(lengths), HEADS * HEAD_DIM) for _ in range(LAYERS)] for name in "on"
            }
            times: dict[str, list[float]] = {"o": [], "n": []}
            for r in range(args.repeats):
                order = (("o", old), ("n", new)) if r % 2 == 0 else (("n", new), ("o", old))
                for name, library in order:
                    times[name].append(case.step(library, outs[name], args.threads))
            ratios = sorted(o / n for o, n in zip(times["o"], times["n"], strict=True))
            print(f"{label}: {case.bytes / 1e6:.0f} MB of KV a step; {compare(outs['n'], outs['o'])}")
            for name in "on":
                best = min(times[name])
                print(
                    f"  {'old' if name == 'o' else 'new'}: best {best * 1e3:.2f} ms a step "
                    f"(median {sorted(times[name])[len(times[name]) // 2] * 1e3:.2f}), "
                    f"{best / case.keys * 1e9:.1f} ns per (key, KV head), {case.bytes / best / 1e9:.1f} GB/s"
                )
            print(
                f"  speed-up best/best {min(times['o']) / min(times['n']):.2f}x; pairs "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}x, median {ratios[len(ratios) // 2]:.2f}x"
            )


if __name__ == "__main__":
    main()
