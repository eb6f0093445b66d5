"""``servekit bench``'s flags (``vllm bench serve``'s names) and running it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from servekit.bench.datasets import DATASETS, DatasetError, load_prompts
from servekit.bench.runner import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, LoadSettings, RequestResult


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 50,90,99, got {text!r}") from None
    if not values or not all(0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError("percentiles must be in (0, 100]")
    return values


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    add(
        "--endpoint",
        default=COMPLETIONS_ENDPOINT,
        choices=(COMPLETIONS_ENDPOINT, CHAT_ENDPOINT),
        help=f"the API to load (default: {COMPLETIONS_ENDPOINT})",
    )
    add("--model", default=None, help="model id (default: the server's first in /v1/models)")
    add("--api-key", default=None, help="Bearer token (env: OPENAI_API_KEY)")
    add("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    add("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    add(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    add("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals; 1 = Poisson")
    add("--dataset-name", default="random", choices=DATASETS, help="prompts to send (default: random)")
    add("--dataset-path", default=None, help="ShareGPT JSON or JSONL file, for --dataset-name sharegpt")
    add("--random-input-len", type=int, default=1024, help="words of a random prompt (default: 1024)")
    add("--random-output-len", type=int, default=128, help="tokens to generate (default: 128)")
    add("--random-range-ratio", type=float, default=0.0, help="lengths vary by +- this fraction")
    add("--prefix-len", type=int, default=256, help="words of the shared prefix, for --dataset-name prefix")
    add(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="output tokens for sharegpt (default: the reply's)",
    )
    add("--ignore-eos", action="store_true", help="generate the full output length (vLLM's ignore_eos)")
    add("--extra-body", type=_json_object, default={}, help="JSON object of more request fields")
    add("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    add("--seed", type=int, default=0, help="seed of the prompts, arrivals and sampling (default: 0)")
    add("--num-warmups", type=int, default=1, help="requests sent before measuring (default: 1)")
    add("--timeout", type=float, default=600.0, help="seconds a request may take (default: 600)")
    add("--metric-percentiles", type=_percentiles, default=[50.0, 90.0, 99.0], help="default: 50,90,99")
    add("--json", dest="json_path", default=None, metavar="FILE", help="write the full report as JSON")
    add("--plot", dest="plot_path", default=None, metavar="FILE.png", help="draw latencies and throughput")
    add("--disable-tqdm", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> str | None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        return "--max-concurrency must be at least 1"
    if args.request_rate <= 0:
        return "--request-rate must be positive (inf: all at once)"
    if args.burstiness <= 0:
        return "--burstiness must be positive"
    if args.num_warmups < 0:
        return "--num-warmups cannot be negative"
    if args.plot_path is not None and not args.plot_path.lower().endswith(".png"):
        return "--plot writes a PNG file: give a name ending in .png"
    return None


def run_bench_command(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem is None and args.plot_path is not None:
        from servekit.bench.plot import check_plot_available

        try:
            check_plot_available()
        except RuntimeError as error:
            problem = str(error)
    if problem is not None:
        print(f"servekit bench: error: {problem}", file=sys.stderr)
        return 2
    try:
        prompts = load_prompts(
            args.dataset_name,
            args.num_prompts,
            path=args.dataset_path,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            prefix_len=args.prefix_len,
            sharegpt_output_len=args.sharegpt_output_len,
            seed=args.seed,
        )
    except DatasetError as error:
        print(f"servekit bench: error: {error}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_bench(args, prompts))
    except (RuntimeError, OSError) as error:
        print(f"servekit bench: error: {error}", file=sys.stderr)
        return 1
    from servekit.bench.report import format_report

    print(format_report(report, args.metric_percentiles))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_path}")
    if args.plot_path:
        from servekit.bench.plot import plot_report

        plot_report(report, Path(args.plot_path))
        print(f"wrote {args.plot_path}")
    return 0 if report["completed"] else 1


async def _bench(args: argparse.Namespace, prompts: list[Any]) -> dict[str, Any]:
    from servekit.bench.report import summarize
    from servekit.bench.runner import first_model, run_load

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    try:
        model = args.model or await first_model(args.base_url, api_key, args.timeout)
    except OSError as error:
        raise RuntimeError(f"cannot reach {args.base_url}: {error}") from None
    settings = LoadSettings(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=model,
        max_concurrency=args.max_concurrency,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        timeout=args.timeout,
        api_key=api_key,
        extra_body=args.extra_body,
    )
    progress = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr)

    def on_done(result: RequestResult) -> None:
        if progress is not None:
            progress.update(1)

    try:
        warmups, results, duration = await run_load(settings, prompts, args.num_warmups, on_done)
    finally:
        if progress is not None:
            progress.close()
    failed_warmups = [w.error for w in warmups if not w.ok]
    if failed_warmups:
        raise RuntimeError(f"the warm-up request failed: {failed_warmups[0]}")
    return summarize(
        results,
        duration,
        args.metric_percentiles,
        {
            "base_url": args.base_url,
            "endpoint": args.endpoint,
            "model": model,
            "dataset_name": args.dataset_name,
            "num_prompts": len(prompts),
            "max_concurrency": args.max_concurrency,
            "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
            "burstiness": args.burstiness,
            "ignore_eos": args.ignore_eos,
            "seed": args.seed,
        },
    )
