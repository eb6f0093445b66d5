"""``quantization=int8`` against the exact default path, same run: speed (CPU time) and accuracy.

The default model (SmolLM2-135M-Instruct, Q4_1/Q8_0 GGUF) through ``ModelRunner``, both modes as the
engine builds them (exact: on the GGUF blocks, float32 KV cache; int8: blocks kept for batch-1 steps,
one-row projections with 8-bit activations on the blocks, ``Int8Linear`` from 2 rows, bfloat16 KV cache). Speed: CPU milliseconds (``time.process_time``, all
threads) of a decode step at batch 1 and 32 (contexts of ~64 tokens) and of a 128-token prefill,
measured in interleaved pairs (exact, int8, exact, ...) ``--repeats`` times; the best of each and
the median of the per-pair ratios are printed. Accuracy, teacher-forced over ``--tokens`` tokens of
English text, once as one prefill (int8: ``Int8Linear``) and once as batch-1 steps (int8: 8-bit
activations on the blocks): top-1 agreement of int8's next-token argmax with exact's and the mean
KL(exact || int8) of the next-token distributions.

With ``--llama-server PATH`` the same for llama.cpp (its 8-bit-activation dot products on the same GGUF
file): llama-server's next-token distribution after each prefix of the same token ids, one token
evaluated per position (a batch-1 step, as int8's stepped figures), known by its top ``--llama-top-k``
log-probabilities (more where they hold less than 0.999 of the mass); compared with exact's full
distribution on those tokens plus one tail bucket (``topk_agreement.py``: a lower bound of the full-vocabulary
KL, equal when nothing is left in the tail). Printed: llama.cpp against exact (top-1, KL), int8's
stepped figures on the same buckets beside its full-vocabulary ones, and int8 against llama.cpp (top-1).
``--repeats 0`` skips the speed part.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/bench_int8.py [--threads 2] [--repeats 5]
        [--llama-server PATH [--llama-top-k 1024]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_server import default_gguf, llama_server, next_token_topk, tokenize
from topk_agreement import TopK, agreement, restrict

from servekit.cpu import cpu_model
from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.models.linear import int8_dot_product_unit

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes. Within fifty years presses were at work in more than two "
    "hundred cities across Europe, and the price of books fell so far that ordinary merchants could "
    "own them. Scholars argue about how much the press changed the world, but few doubt that it "
    "helped spread the ideas of the Renaissance and the Reformation, made scientific results easier "
    "to check and to share, and encouraged the growth of literacy. Newspapers appeared in the early "
    "seventeenth century, first as weekly sheets of foreign news, later as daily papers with local "
    "reporting, advertisements and letters from readers. The steam-powered rotary press of the "
    "nineteenth century lowered costs again, and by 1900 a large city paper could print hundreds of "
    "thousands of copies in a night. Photography, the telegraph and later the radio each changed what "
    "a newspaper was for, yet the basic idea of setting words in type and pressing them onto paper "
    "survived until computers replaced the composing room in the 1970s and 1980s."
)
BLOCK = 16


def build(source: ModelSource, int8: bool) -> ModelRunner:
    return ModelRunner(
        source.config,
        source.iter_weight_blocks(),
        num_blocks=33 * 40,
        block_size=BLOCK,
        max_model_len=2048,
        quantization="int8" if int8 else None,
        kv_cache_dtype=torch.bfloat16 if int8 else None,
    )


def decode_ms(runner: ModelRunner, prompt: list[int], batch: int, steps: int) -> float:
    tables = [list(range(i * 40, (i + 1) * 40)) for i in range(batch)]
    runner.execute(ForwardBatch([prompt] * batch, [0] * batch, tables))
    start = time.process_time()
    for step in range(steps):
        runner.execute(ForwardBatch([[1]] * batch, [len(prompt) + step] * batch, tables))
    return (time.process_time() - start) / steps * 1e3


def prefill_ms(runner: ModelRunner, prompt: list[int]) -> float:
    start = time.process_time()
    runner.execute(ForwardBatch([prompt], [0], [list(range(40))]))
    return (time.process_time() - start) * 1e3


def teacher_forced(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    table = list(range((len(ids) + BLOCK - 1) // BLOCK))
    out = runner.execute(ForwardBatch([ids], [0], [table], all_logits=[True])).all_logits[0]
    assert out is not None
    return out.float()


def stepped(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """The next-token logits after each token of ``ids``, fed one per batch-1 step (the native step)."""
    table = list(range((len(ids) + BLOCK - 1) // BLOCK))
    rows = [
        runner.execute(ForwardBatch([[token]], [i], [table])).last_logits[0] for i, token in enumerate(ids)
    ]
    return torch.stack(rows).float()


def full_agreement(name: str, exact: torch.Tensor, int8: torch.Tensor) -> None:
    top1 = (exact.argmax(-1) == int8.argmax(-1)).float().mean().item()
    log_p, log_q = exact.log_softmax(-1), int8.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    print(
        f"{name} over {exact.shape[0]} tokens: top-1 agreement {top1:.1%}, "
        f"KL(exact || int8) mean {kl.mean().item():.4f} nats, max {kl.max().item():.3f}"
    )


def llama_agreement(exact: torch.Tensor, int8: dict[str, torch.Tensor], llama: Sequence[TopK]) -> None:
    """llama.cpp's top-K answers against exact's stepped logits, int8 on the same buckets, int8 vs llama."""
    sizes = sorted(len(top.ids) for top in llama)
    found = agreement(exact, llama)
    print(
        f"llama.cpp (llama-server, batch-1 steps) over {found.positions} tokens, top-K of {sizes[0]}-"
        f"{sizes[-1]} tokens, returned mass >= {found.min_mass:.5f}: top-1 agreement with exact "
        f"{found.top1:.1%}, KL(exact || llama.cpp) mean {found.kl_mean:.4f} nats, max {found.kl_max:.3f} "
        "(tail-bucketed)"
    )
    for name, logits in int8.items():
        bucketed = agreement(exact, [restrict(row, top.ids) for row, top in zip(logits, llama, strict=True)])
        same = sum(int(row.argmax().item() == top.top1) for row, top in zip(logits, llama, strict=True))
        print(
            f"int8 {name} on llama.cpp's buckets: KL(exact || int8) mean {bucketed.kl_mean:.4f} nats, "
            f"max {bucketed.kl_max:.3f}; top-1 agreement with llama.cpp {same / len(llama):.1%}"
        )


def llama_distributions(binary: str, ids: list[int], text: str, args: argparse.Namespace) -> list[TopK]:
    """llama-server's top-K next-token answers after each prefix of ``ids`` (the default model's GGUF)."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "llama-server.log"
        with llama_server(binary, default_gguf(), args.threads, len(ids) + 64, log) as url:
            theirs = tokenize(url, text)
            if theirs[: len(ids)] != ids[: len(theirs)]:
                print("note: llama-server tokenizes the text differently; the same token ids are sent")
            start = time.monotonic()
            tops = next_token_topk(url, ids, args.vocab, top_k=args.llama_top_k)
            print(f"llama-server: {len(ids)} positions in {time.monotonic() - start:.1f} s")
    return tops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--llama-server", default=None, help="llama-server binary: llama.cpp's figures too")
    parser.add_argument("--llama-top-k", type=int, default=1024, help="log-probabilities asked per position")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as handle:
        load = handle.read().strip()
    print(f"CPU: {cpu_model()}; int8 unit: {int8_dot_product_unit()}; {args.threads} threads; load {load}")
    source = load_model_source(None)
    ids = source.tokenizer.encode(TEXT, add_special_tokens=False)
    while len(ids) < args.tokens:
        ids += ids
    ids = ids[: args.tokens]
    runners = {"exact": build(source, False), "int8": build(source, True)}
    measures: dict[str, Callable[[ModelRunner], float]] = {
        "decode batch 1": lambda r: decode_ms(r, ids[:64], 1, 32),
        "decode batch 32": lambda r: decode_ms(r, ids[:64], 32, 8),
        "prefill 128": lambda r: prefill_ms(r, ids[:128]),
    }
    if args.repeats:
        print(
            "| shape | exact ms (best) | int8 ms (best) | int8/exact (median of pairs) |\n|---|---:|---:|---:|"
        )
    with torch.no_grad():
        for name, measure in measures.items() if args.repeats else ():
            times: dict[str, list[float]] = {mode: [] for mode in runners}
            for _ in range(args.repeats):
                for mode, runner in runners.items():
                    times[mode].append(measure(runner))
            ratio = statistics.median(i / e for e, i in zip(times["exact"], times["int8"], strict=True))
            print(
                f"| {name} | {min(times['exact']):.2f} | {min(times['int8']):.2f} | {ratio:.2f} |", flush=True
            )
        exact, int8_prefill = (teacher_forced(runners[mode], ids) for mode in ("exact", "int8"))
        full_agreement("teacher-forced, one prefill (Int8Linear)", exact, int8_prefill)
        exact, int8_steps = (stepped(runners[mode], ids) for mode in ("exact", "int8"))
        full_agreement("teacher-forced, batch-1 steps (8-bit activations on the blocks)", exact, int8_steps)
    if args.llama_server:
        args.vocab = exact.shape[-1]
        llama = llama_distributions(args.llama_server, ids, TEXT, args)
        llama_agreement(exact, {"one prefill": int8_prefill, "batch-1 steps": int8_steps}, llama)
    with open("/proc/loadavg") as handle:
        print(f"load after: {handle.read().strip()}")


if __name__ == "__main__":
    main()
