"""One check of the engine on a CUDA GPU, printing one summary (exit 0 only when every part passed).

1. the engine tests on cuda (``tests/llm/test_cuda.py``: logits cuda vs cpu per family, greedy text,
   the KV cache sized by gpu_memory_utilization, 16-bit auto dtype, NCCL tp=2 with 2 GPUs);
2. the default model's logits on cuda vs cpu (float32);
3. ``servekit serve --device cuda`` of the default model, loaded by ``benchmarks/bench_serve.py``.

Where there is no CUDA GPU it prints ``gpu_check: no CUDA GPU: skipped`` and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [--num-prompts 64 --concurrency 16 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run(
    name: str, command: list[str], results: dict[str, str], timeout: float, env: dict[str, str] | None = None
) -> None:
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), **(env or {})}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        results[name] = f"FAILED (timed out after {timeout:.0f}s)"
        return
    tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
    print(f"--- {name}: exit {done.returncode} in {time.monotonic() - started:.0f}s", *tail, sep="\n")
    results[name] = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"


def compare_default_model() -> str:
    """Max |logit difference| cuda vs cpu (float32) of the default model over a prefill and 8 decodes."""
    import torch

    from servekit.llm.loaders import load_model_source
    from servekit.llm.model_runner import ForwardBatch, ModelRunner

    source = load_model_source(None)
    prompt = source.tokenizer.encode("The capital of France is")
    logits: dict[str, list[torch.Tensor]] = {}
    for device in ("cpu", "cuda"):
        runner = ModelRunner(
            source.config,
            source.iter_weights(),
            device=device,
            block_size=16,
            num_blocks=8,
            max_model_len=128,
        )
        tokens = list(prompt)
        out = runner.execute(ForwardBatch([tokens], [0], [list(range(8))]))
        logits[device] = [out.last_logits.cpu()]
        for step in range(8):
            # Both devices decode the CPU's greedy tokens, so their logits stay comparable.
            tokens.append(int(logits["cpu"][step].argmax()))
            out = runner.execute(ForwardBatch([[tokens[-1]]], [len(tokens) - 1], [list(range(8))]))
            logits[device].append(out.last_logits.cpu())
    worst = max(float((a - b).abs().max()) for a, b in zip(logits["cpu"], logits["cuda"], strict=True))
    return (
        f"ok (max |cuda - cpu| = {worst:.2e})" if worst < 1e-2 else f"FAILED (max |cuda - cpu| = {worst:.2e})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not cuda_available():
        print("gpu_check: no CUDA GPU: skipped (torch.cuda.is_available() is False)")
        return 0
    results: dict[str, str] = {}
    run(
        "engine tests on cuda",
        [sys.executable, "-m", "pytest", "-q", "tests/llm/test_cuda.py"],
        results,
        timeout=1800,
    )
    try:
        results["default model logits cuda vs cpu"] = compare_default_model()
    except Exception as error:  # reported in the summary, like every other part
        results["default model logits cuda vs cpu"] = f"FAILED ({error!r})"
    run(
        "serve --device cuda + bench_serve",
        [
            sys.executable,
            "benchmarks/bench_serve.py",
            "--skip-offline",
            "--repeats",
            "1",
            "--num-prompts",
            str(args.num_prompts),
            "--concurrency",
            str(args.concurrency),
            "--max-tokens",
            str(args.max_tokens),
        ],
        results,
        timeout=1800,
        env={"SERVEKIT_DEVICE": "cuda"},  # the server bench_serve starts reads it
    )
    print("\n=== gpu_check summary ===")
    for name, outcome in results.items():
        print(f"{name}: {outcome}")
    return 0 if all(outcome.startswith("ok") for outcome in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
