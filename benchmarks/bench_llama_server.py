"""servekit serve against llama.cpp's own C++ server (`llama-server`), same GGUF, same load client.

Both serve the default model's GGUF (SmolLM2-135M-Instruct, Q4_1) with the same number of threads;
llama-server with ``--parallel P --cont-batching`` (P = the highest concurrency), servekit with its
defaults (the exact kernels on the file's blocks). One load client for both, `servekit bench`
(`/v1/completions`, streamed, greedy, ``ignore_eos``): random prompts of ``--input-len`` words and
``--output-len`` tokens at each concurrency of ``--concurrency``, and a shared-prefix workload (a
``--prefix-len``-word system prompt before every prompt) at ``--prefix-concurrency``. The servers
alternate, one whole pass each, ``--repeats`` times, and the medians are compared.

    benchmarks/build_llama_server.sh            # once: builds llama-server outside the repo
    .venv/bin/python benchmarks/bench_llama_server.py --llama-server PATH [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import free_port  # noqa: E402
from llama_server import bench_env, default_gguf, llama_command, running  # noqa: E402

from servekit.cpu import cpu_flags, cpu_model  # noqa: E402

VECTOR_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
)


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    bench_args: tuple[str, ...]


@contextlib.contextmanager
def server(kind: str, gguf: Path, args: argparse.Namespace, parallel: int, log: Path) -> Iterator[str]:
    """``servekit`` or ``llama-server`` serving ``gguf`` with ``args.threads`` threads (llama-server
    with ``parallel`` slots) on a free loopback port, its output in ``log``; yields its URL."""
    port = free_port()
    extra_env: dict[str, str] = {}
    if kind == "servekit":
        command = servekit_command(gguf, port, args)
        extra_env = dict(item.split("=", 1) for item in args.servekit_env)
    else:
        context = parallel * (args.prefix_len * 2 + args.input_len * 2 + args.output_len + 64)
        command = llama_command(args.llama_server, gguf, port, args.threads, parallel, context)
    with running(command, port, args.threads, log, timeout=600, extra_env=extra_env) as url:
        yield url


def servekit_command(gguf: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "servekit.cli", "serve", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--num-threads", str(args.threads),
        *args.servekit_arg,
    ]  # fmt: skip


def run_bench(url: str, workload: Workload, args: argparse.Namespace, out: Path) -> dict[str, float]:
    command = [
        sys.executable, "-m", "servekit.cli", "bench",
        "--base-url", url,
        "--endpoint", "/v1/completions",
        "--num-prompts", str(workload.num_prompts),
        "--max-concurrency", str(workload.concurrency),
        "--ignore-eos",
        "--seed", "0",
        "--disable-tqdm",
        "--json", str(out),
        *workload.bench_args,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=bench_env(), stdout=subprocess.DEVNULL, timeout=3600)
    report = json.loads(out.read_text())
    if report["failed"]:
        errors = {e for e in report["errors"] if e}
        raise RuntimeError(f"{workload.name}: {report['failed']} requests failed against {url}: {errors}")
    return {
        "output_tok_s": float(report["output_throughput"]),
        "ttft_p50_ms": float(report["median_ttft_ms"]),
        "tpot_p50_ms": float(report["median_tpot_ms"]),
        "prompt_tok_s": float(report["total_input_tokens"]) / float(report["duration"]),
    }


def workloads(args: argparse.Namespace) -> list[Workload]:
    random = ("--dataset-name", "random", "--random-input-len", str(args.input_len))
    output = ("--random-output-len", str(args.output_len))
    found = [
        Workload(f"random {args.input_len}/{args.output_len}, c={c}", c, max(c * 2, 4), (*random, *output))
        for c in args.concurrency
    ]
    c = args.prefix_concurrency
    prefix = ("--dataset-name", "prefix", "--prefix-len", str(args.prefix_len), "--random-input-len", "32")
    found.append(Workload(f"shared {args.prefix_len}-word prefix, c={c}", c, c * 3, (*prefix, *output)))
    return found


def server_arguments(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options of both servers (binary, GGUF, threads, extra servekit flags)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--llama-server", required=True, help="the llama-server binary (build_llama_server.sh)"
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the default model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--servekit-arg", action="append", default=[], help="extra `servekit serve` flag")
    parser.add_argument(
        "--servekit-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of `servekit serve` only",
    )
    return parser


def main() -> None:
    parser = server_arguments(__doc__)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prefix-concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs and reports here")
    args = parser.parse_args()
    gguf = args.model or default_gguf()
    loads = workloads(args)
    parallel = max(w.concurrency for w in loads)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.log_dir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for repeat in range(args.repeats):
            for kind in ("servekit", "llama-server"):
                print(
                    f"# run {repeat + 1}/{args.repeats}: {kind}; load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                with server(kind, gguf, args, parallel, tmp / f"{kind}-{repeat}.log") as url:
                    for index, workload in enumerate(loads):
                        figures = run_bench(url, workload, args, tmp / f"{kind}-{repeat}-{index}.json")
                        results.setdefault((kind, workload.name), []).append(figures)
                        print(f"  {workload.name}: {figures}", flush=True)
    flags = sorted(cpu_flags() & set(VECTOR_FLAGS))
    print(f"\nCPU: {cpu_model()} (flags: {' '.join(flags)}); {args.threads} threads each; model {gguf.name}")
    print(f"medians of {args.repeats} interleaved runs\n")
    print(
        "| workload | servekit tok/s | llama-server tok/s | ratio | servekit TTFT p50 | llama-server TTFT p50 | TTFT ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for workload in loads:
        ours = {
            k: statistics.median(r[k] for r in results["servekit", workload.name])
            for k in results["servekit", workload.name][0]
        }
        theirs = {k: statistics.median(r[k] for r in results["llama-server", workload.name]) for k in ours}
        print(
            f"| {workload.name} | {ours['output_tok_s']:.1f} | {theirs['output_tok_s']:.1f} | "
            f"{ours['output_tok_s'] / theirs['output_tok_s']:.2f}x | {ours['ttft_p50_ms']:.0f} ms | "
            f"{theirs['ttft_p50_ms']:.0f} ms | {ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
