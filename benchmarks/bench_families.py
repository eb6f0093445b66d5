"""Throughput of the engine on non-Llama families against transformers ``generate``, same run, and
the cost of a sparse-MoE step against a dense step of the same active parameter count.

Checkpoints are random, written with transformers (``tests/llm/tiny_models.build_family_checkpoint``)
at a small but not tiny size (hidden 256, 4 layers, MLP 1024). Workload: ``--num-prompts`` random
prompts of 16-80 tokens, each generating ``--max-tokens`` tokens (greedy, eos ignored); the engine
gets them all at once, transformers as one static left-padded batch, both in float32.

MoE vs dense: Mixtral with 8 experts of width 512, top-2 (1024 active MLP columns per token) against
a Llama of MLP width 1024, otherwise identical; one decode step of ``--num-prompts`` sequences.

    PYTHONPATH=src:. .venv/bin/python benchmarks/bench_families.py [--threads 2] [--num-prompts 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchmarks.bench_engine import run_engine, static_generate

from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from tests.llm.tiny_models import build_family_checkpoint

LLAMA_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512, "n_inner": 1024},
    "phi": {**LLAMA_SHAPE, "partial_rotary_factor": 0.5},
    "mixtral": {**LLAMA_SHAPE, "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2},
}


def prompts_for(vocab: int, count: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(16 + (i * 37) % 65)] for i in range(count)]


def engine_throughput(directory: Path, prompts: list[list[int]], max_tokens: int) -> float:
    result, _ = run_engine(load_model_source(str(directory)), prompts, max_tokens, "float32")
    return result.tokens_per_second


def transformers_throughput(directory: Path, prompts: list[list[int]], max_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    seconds, generated = static_generate(model, prompts, max_tokens, pad=0)
    return generated.numel() / seconds


def decode_step_seconds(directory: Path, batch: int, steps: int = 20) -> float:
    source = load_model_source(str(directory))
    runner = ModelRunner(
        source.config, source.iter_weights(), block_size=16, num_blocks=batch * 8, max_model_len=128
    )
    prompts = prompts_for(source.config.vocab_size, batch)
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(batch)]
    runner.execute(ForwardBatch([p[:16] for p in prompts], [0] * batch, tables))
    times = []
    for step in range(steps):
        started = time.perf_counter()
        runner.execute(ForwardBatch([[p[step % 16]] for p in prompts], [16 + step] * batch, tables))
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--moe-only", action="store_true", help="only the MoE-vs-dense step costs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        out.write(
            "| family | servekit engine tok/s | transformers static batch tok/s | ratio |\n|---|---:|---:|---:|\n"
        )
        for family, config in FAMILIES.items():
            directory = build_family_checkpoint(Path(tmp) / family, family, config)
            if args.moe_only:
                continue
            vocab = load_model_source(str(directory)).config.vocab_size
            prompts = prompts_for(vocab, args.num_prompts)
            ours = engine_throughput(directory, prompts, args.max_tokens)
            theirs = transformers_throughput(directory, prompts, args.max_tokens)
            out.write(f"| {family} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |\n")
            out.flush()
        dense = build_family_checkpoint(Path(tmp) / "dense", "llama", LLAMA_SHAPE)
        moe = Path(tmp) / "mixtral"
        for batch in sorted({1, args.num_prompts}):
            dense_step, moe_step = decode_step_seconds(dense, batch), decode_step_seconds(moe, batch)
            out.write(
                f"\nMoE decode step (batch {batch}, 8 experts top-2 of width 512): {moe_step * 1e3:.2f} ms; "
                f"dense step (MLP width 1024): {dense_step * 1e3:.2f} ms; ratio {moe_step / dense_step:.2f}x\n"
            )


if __name__ == "__main__":
    main()
