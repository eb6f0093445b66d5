"""Throughput of the engine on non-Llama families against transformers ``generate``, same run, and
the cost of a sparse-MoE step against a dense step of the same active parameter count.

Checkpoints are random, written with transformers (``tests/llm/tiny_models.build_family_checkpoint``),
4 layers, at ``--width small`` (hidden 256, MLP 1024) or ``--width wide`` (GPT-2 small's hidden 768,
12 heads, MLP 3072). Workload: ``--num-prompts`` random prompts of 16-80 tokens, each generating
``--max-tokens`` tokens (greedy, eos ignored); the engine gets them all at once, transformers as one
static left-padded batch, both in float32. Each side is built once per family and warmed with one
untimed pass of the same workload (first-call costs such as oneDNN's per-shape kernels and the
allocator's growth are out of both); then they alternate ``--repeats`` times, the side that goes
first swapping every repeat, after a ``gc.collect()`` each. The engine's prefix cache is reset
before every pass and the run fails if it hit (a repeated prompt must be computed again). Medians are
reported, with the range of the paired ratios; at ``--threads 1`` also the ratio of process CPU
times, which a loaded machine disturbs less than wall time.

Both sides share the process, so they share its C allocator: the engine raises glibc's mmap and trim
thresholds when it starts (``servekit.host_memory``), and that helps transformers' batch-32 forward
too, more than the engine (on the AVX2 EPYC: transformers ~2.4x, the engine ~1.45x). The benchmark
sets them itself before either side runs, so every pass of both sides runs under the same allocator,
and says so; with ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment glibc's
handling of those stands for both instead.

MoE vs dense: Mixtral with 8 experts of half the dense MLP width, top-2 (the dense MLP's width of
active columns per token) against a Llama of that MLP width, otherwise identical: a prefill step of
``batch`` prompts of 16 tokens and a decode step of ``batch`` sequences, at batch 1 and
``--num-prompts``. At batch 1 the MoE step reads as many expert weights as the dense step reads MLP
weights; at batch 32 every expert is active, so it reads four times as many.

    PYTHONPATH=src:. .venv/bin/python benchmarks/bench_families.py [--threads 2] [--num-prompts 32]
        [--max-tokens 64] [--repeats 3] [--width small|wide] [--families gpt2,phi,mixtral] [--moe-only]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmarks.bench_engine import shared_allocator, static_generate

from servekit.cpu import cpu_flags, cpu_model
from servekit.llm.config import EngineConfig
from servekit.llm.engine import LLMEngine
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.sampling_params import SamplingParams
from tests.llm.tiny_models import build_family_checkpoint

# "small": the recorded shape (per-operator costs matter at this width); "wide": GPT-2 small's widths
# (hidden 768, 12 heads, MLP 3072) at the same depth, where the matmuls dominate.
WIDTHS = {
    "small": {"hidden": 256, "heads": 4, "mlp": 1024},
    "wide": {"hidden": 768, "heads": 12, "mlp": 3072},
}


def shapes(width: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The dense Llama shape and each family's shape; Mixtral's 8 experts of half the MLP width,
    top-2, have the dense MLP's active width."""
    w = WIDTHS[width]
    llama = {
        "hidden_size": w["hidden"],
        "intermediate_size": w["mlp"],
        "num_hidden_layers": 4,
        "num_attention_heads": w["heads"],
        "num_key_value_heads": w["heads"],
        "max_position_embeddings": 512,
    }
    families: dict[str, dict[str, Any]] = {
        "gpt2": {
            "n_embd": w["hidden"],
            "n_layer": 4,
            "n_head": w["heads"],
            "n_positions": 512,
            "n_inner": w["mlp"],
        },
        "phi": {**llama, "partial_rotary_factor": 0.5},
        "mixtral": {
            **llama,
            "intermediate_size": w["mlp"] // 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    }
    return llama, families


def prompts_for(vocab: int, count: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(16 + (i * 37) % 65)] for i in range(count)]


class Side:
    """One side of the comparison, built once: ``run()`` generates the workload and returns
    (generated tokens per wall second, per process CPU second)."""

    def __init__(self, generate: Callable[[], int], expected: int) -> None:
        self.generate, self.expected = generate, expected
        self._checked()  # the untimed warm-up pass

    def _checked(self) -> int:
        tokens = self.generate()
        if tokens != self.expected:
            raise RuntimeError(f"generated {tokens} tokens, not the workload's {self.expected}")
        return tokens

    def run(self) -> tuple[float, float]:
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = self._checked()
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def engine_side(directory: Path, prompts: list[list[int]], max_tokens: int) -> Side:
    config = EngineConfig(
        dtype="float32",
        max_model_len=max(len(p) for p in prompts) + max_tokens + 16,
        max_num_seqs=len(prompts),
    )
    engine = LLMEngine(config, source=load_model_source(str(directory)))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    passes = itertools.count()

    def generate() -> int:
        engine.reset_prefix_cache()
        hits = engine.get_stats().prefix_cache_hits
        tag = next(passes)
        for index, prompt in enumerate(prompts):
            engine.add_request(f"{tag}-{index}", prompt_token_ids=prompt, params=params)
        generated = 0
        while engine.has_unfinished_requests():
            for output in engine.step(final_only=True):
                generated += len(output.outputs[0].token_ids)
        if engine.get_stats().prefix_cache_hits != hits:
            raise RuntimeError("the engine reused cached prompt blocks: the comparison would be unfair")
        return generated

    return Side(generate, len(prompts) * max_tokens)


def transformers_side(directory: Path, prompts: list[list[int]], max_tokens: int) -> Side:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return Side(
        lambda: static_generate(model, prompts, max_tokens, pad=0)[1].numel(), len(prompts) * max_tokens
    )


def step_seconds(
    directory: Path, batch: int, clock: Callable[[], float], steps: int = 20
) -> tuple[float, float]:
    """Median seconds (of ``clock``) of a prefill step (``batch`` prompts of 16 tokens) and of a
    decode step (``batch`` sequences, one token each)."""
    source = load_model_source(str(directory))
    runner = ModelRunner(
        source.config, source.iter_weights(), block_size=16, num_blocks=batch * 8, max_model_len=128
    )
    prompts = prompts_for(source.config.vocab_size, batch)
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(batch)]
    prefill = ForwardBatch([p[:16] for p in prompts], [0] * batch, tables)
    runner.execute(prefill)
    prefills = []
    for _ in range(5):  # the same prompts again: the cache is overwritten with the same keys
        started = clock()
        runner.execute(prefill)
        prefills.append(clock() - started)
    decodes = []
    for step in range(steps):
        started = clock()
        runner.execute(ForwardBatch([[p[step % 16]] for p in prompts], [16 + step] * batch, tables))
        decodes.append(clock() - started)
    return statistics.median(prefills), statistics.median(decodes)


def machine() -> str:
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "amx")))
    return f"{cpu_model()} ({' '.join(flags)}), load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"


def ratios(ours: list[float], theirs: list[float]) -> str:
    """Median ratio, and its range over the paired repeats."""
    paired = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return f"{statistics.median(ours) / statistics.median(theirs):.2f}x ({paired[0]:.2f}-{paired[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are reported)")
    parser.add_argument("--width", choices=sorted(WIDTHS), default="small")
    parser.add_argument("--families", default=",".join(shapes("small")[1]), help="comma-separated subset")
    parser.add_argument("--moe-only", action="store_true", help="only the MoE-vs-dense step costs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    dense_shape, family_shapes = shapes(args.width)
    chosen = args.families.split(",")
    unknown = set(chosen) - family_shapes.keys()
    if unknown:
        parser.error(f"unknown families {sorted(unknown)} (known: {', '.join(family_shapes)})")
    out = sys.stdout
    out.write(
        f"{machine()}; {args.threads} threads, width {args.width} {WIDTHS[args.width]};"
        f" allocator for both sides: {shared_allocator()}\n\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        directories = {
            family: build_family_checkpoint(Path(tmp) / family, family, family_shapes[family])
            for family in {*chosen, "mixtral"}
        }
        directories["dense"] = build_family_checkpoint(Path(tmp) / "dense", "llama", dense_shape)
        if not args.moe_only:
            cpu_column = args.threads == 1
            out.write(
                f"| family | servekit engine tok/s | transformers static batch {args.num_prompts} tok/s "
                "| ratio (range) |"
                + (" CPU-time ratio (range) |" if cpu_column else "")
                + "\n|---|---:|---:|---:|"
                + ("---:|" if cpu_column else "")
                + "\n"
            )
            for family in chosen:
                vocab = load_model_source(str(directories[family])).config.vocab_size
                prompts = prompts_for(vocab, args.num_prompts)
                sides = {
                    "engine": engine_side(directories[family], prompts, args.max_tokens),
                    "transformers": transformers_side(directories[family], prompts, args.max_tokens),
                }
                runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
                for repeat in range(args.repeats):  # alternating, so a change of load hits both
                    for name in sorted(sides, reverse=repeat % 2 == 1):
                        runs[name].append(sides[name].run())
                del sides
                ours, theirs = ([wall for wall, _ in runs[name]] for name in ("engine", "transformers"))
                row = f"| {family} | {statistics.median(ours):.0f} | {statistics.median(theirs):.0f} | {ratios(ours, theirs)} |"
                if cpu_column:
                    row += f" {ratios(*([cpu for _, cpu in runs[name]] for name in ('engine', 'transformers')))} |"
                out.write(row + "\n")
                out.flush()
        # One thread: process CPU time, which other processes on the machine disturb less.
        clock, clock_name = (
            (time.process_time, "process CPU time") if args.threads == 1 else (time.perf_counter, "wall time")
        )
        out.write(
            "\nMoE (8 experts top-2, each half the dense MLP width) vs dense (same active MLP width), "
            f"median ms per step ({clock_name}):\n\n| batch | MoE prefill | dense prefill | ratio | MoE decode | dense decode | ratio |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        for batch in sorted({1, args.num_prompts}):
            moe_runs, dense_runs = [], []
            for repeat in range(args.repeats):  # alternating, the first swapping every repeat
                for name in sorted(("mixtral", "dense"), reverse=repeat % 2 == 0):
                    (moe_runs if name == "mixtral" else dense_runs).append(
                        step_seconds(directories[name], batch, clock)
                    )
            moe_prefill, moe_decode = ([run[i] for run in moe_runs] for i in (0, 1))
            dense_prefill, dense_decode = ([run[i] for run in dense_runs] for i in (0, 1))
            out.write(
                f"| {batch} | {statistics.median(moe_prefill) * 1e3:.2f} | {statistics.median(dense_prefill) * 1e3:.2f} "
                f"| {ratios(moe_prefill, dense_prefill)} | {statistics.median(moe_decode) * 1e3:.2f} "
                f"| {statistics.median(dense_decode) * 1e3:.2f} | {ratios(moe_decode, dense_decode)} |\n"
            )
            out.flush()
        out.write(f"\nafter: {machine()}\n")


if __name__ == "__main__":
    main()
