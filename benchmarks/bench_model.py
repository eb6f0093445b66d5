"""Forward-pass throughput of servekit's ModelRunner against transformers, same weights, same run.

Scenarios (per dtype): decode at batch 1 and batch 32 (each sequence with a ``--context``-token
prompt, then ``--steps`` decode steps), and prefill of a batch of prompts. transformers runs its
model forward with a DynamicCache (what ``generate`` does); servekit runs ``ModelRunner.execute``.
Weights are SmolLM2-135M-Instruct from the GGUF (dequantised) when the loader can read it, else a
random model of the same shape.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_model.py [--dtypes float32,bfloat16] [--steps 32]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from servekit.llm.model_config import ModelConfig
from servekit.llm.model_runner import ForwardBatch, ModelRunner

SMOLLM2_SHAPE: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def load_weights() -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    try:
        from servekit.llm.loaders import load_model_source

        source = load_model_source(None)
        weights = {name: tensor.float() for name, tensor in source.iter_weights()}
        return "SmolLM2-135M (GGUF, dequantised)", source.config, weights
    except Exception as error:  # the GGUF loader may not exist yet; fall back to random weights
        print(f"(GGUF not loadable: {error}; using a random SmolLM2-shaped model)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    config = ModelConfig(
        architecture="llama",
        head_dim=SMOLLM2_SHAPE["hidden_size"] // SMOLLM2_SHAPE["num_attention_heads"],
        **SMOLLM2_SHAPE,
    )
    return "random SmolLM2-shaped", config, {k: v.detach() for k, v in model.state_dict().items()}


def hf_model(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    model = LlamaForCausalLM(hf_config)
    model.load_state_dict(weights, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def timed(fn: Callable[[], None], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hf_decode(model: Any, batch: int, context: int, steps: int) -> float:
    """Seconds for ``steps`` decode steps of ``batch`` sequences after a ``context``-token prefill."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)

        def run() -> None:
            nonlocal token
            for _ in range(steps):
                result = model(token, past_key_values=cache, use_cache=True)
                token = result.logits[:, -1:].argmax(-1)

        return timed(run)


def runner_decode(runner: ModelRunner, batch: int, context: int, steps: int) -> float:
    blocks_per_seq = (context + steps + runner.block_size - 1) // runner.block_size
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    prompts = torch.randint(0, runner.config.vocab_size, (batch, context)).tolist()
    out = runner.execute(ForwardBatch(prompts, [0] * batch, tables))
    tokens = out.last_logits.argmax(-1).tolist()

    def run() -> None:
        nonlocal tokens
        for step in range(steps):
            result = runner.execute(ForwardBatch([[t] for t in tokens], [context + step] * batch, tables))
            tokens = result.last_logits.argmax(-1).tolist()

    return timed(run)


def hf_prefill(model: Any, batch: int, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.no_grad():
        model(ids[:, :8])
        return timed(lambda: model(ids, logits_to_keep=1) and None)


def runner_prefill(runner: ModelRunner, batch: int, length: int) -> float:
    blocks_per_seq = (length + runner.block_size - 1) // runner.block_size
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    prompts = torch.randint(0, runner.config.vocab_size, (batch, length)).tolist()
    runner.execute(ForwardBatch([p[:8] for p in prompts], [0] * batch, tables))
    return timed(lambda: runner.execute(ForwardBatch(prompts, [0] * batch, tables)) and None)


def best_of(
    repeats: int, ours: Callable[[], float], theirs: Callable[[], float] | None
) -> tuple[float, float]:
    """Alternate the two measurements ``repeats`` times and keep each one's best (least disturbed)."""
    best_ours = best_theirs = float("inf")
    for _ in range(repeats):
        best_ours = min(best_ours, ours())
        if theirs is not None:
            best_theirs = min(best_theirs, theirs())
    return best_ours, best_theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per scenario (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    label, config, weights = load_weights()
    print(f"model: {label}; threads={args.threads}; context={args.context}; steps={args.steps}", flush=True)
    for dtype_name in args.dtypes.split(","):
        bench_dtype(args, config, weights, dtype_name)
        gc.collect()


def bench_dtype(
    args: argparse.Namespace, config: ModelConfig, weights: dict[str, torch.Tensor], dtype_name: str
) -> None:
    dtype = getattr(torch, dtype_name)
    runner = ModelRunner(
        config, weights.items(), dtype=dtype, num_blocks=400, block_size=16, max_model_len=4096
    )
    reference = None if args.skip_hf else hf_model(config, weights, dtype)
    for batch in (1, 32):
        ours, theirs = best_of(
            args.repeats,
            lambda b=batch: runner_decode(runner, b, args.context, args.steps),
            None if reference is None else lambda b=batch: hf_decode(reference, b, args.context, args.steps),
        )
        print_row(dtype_name, f"decode batch {batch}", batch * args.steps, ours, theirs)
    ours, theirs = best_of(
        args.repeats,
        lambda: runner_prefill(runner, args.prefill_batch, args.prefill_len),
        None if reference is None else lambda: hf_prefill(reference, args.prefill_batch, args.prefill_len),
    )
    tokens = args.prefill_batch * args.prefill_len
    print_row(dtype_name, f"prefill {args.prefill_batch}x{args.prefill_len}", tokens, ours, theirs)


def print_row(dtype: str, scenario: str, tokens: int, ours: float, theirs: float) -> None:
    line = f"{dtype:9s} {scenario:16s} servekit {tokens / ours:8.1f} tok/s"
    if theirs != float("inf"):
        line += f"  transformers {tokens / theirs:8.1f} tok/s  ratio {theirs / ours:5.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
    main()
