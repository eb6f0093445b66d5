"""Disconnect storm, long version of tests/reliability/test_disconnect_storm.py: N streams (default
1000) cut at seeded random points (mid-request, during prefill, at the first byte, mid-stream; FIN or
RST) against `servekit serve` on a tiny random checkpoint, directly or through `servekit proxy`.
Reports KV blocks, requests left, file descriptors and RSS of every server process before and after,
and the RSS growth of the same number of completed requests as the baseline measured in the same run.

    PYTHONPATH=src:. .venv/bin/python benchmarks/reliability_storm.py [--n 1000] [--proxy]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.e2e.proxying import admitted, proxy_process, wait_for
from tests.e2e.serving import RunningServer, serve_script
from tests.reliability.storm import Resources, metrics, server_pids, storm, wait_until

MODEL = "tiny-llama"
KV_TOTAL = f'servekit:num_kv_blocks{{model_name="{MODEL}"}}'
KV_FREE = f'servekit:num_free_kv_blocks{{model_name="{MODEL}"}}'
RUNNING = f'servekit:num_requests_running{{model_name="{MODEL}"}}'
WAITING = f'servekit:num_requests_waiting{{model_name="{MODEL}"}}'
ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "512", "SERVEKIT_DISABLE_LOG_REQUESTS": "true"}


@contextlib.contextmanager
def target(tmp: Path, proxied: bool) -> Iterator[tuple[str, RunningServer, list[int]]]:
    from tests.llm.tiny_models import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp / "tiny-llama", "llama")
    if not proxied:
        with serve_script("llm_serve.py", tmp, env=ENV, args=[str(model)]) as node:
            yield node.url, node, server_pids(node.process.pid)
        return
    node_args = [str(model), "--proxy-url"]
    with (
        proxy_process(tmp, "--no-state-file") as proxy,
        serve_script("llm_serve.py", tmp, env=ENV, args=[*node_args, proxy.url]) as node,
    ):
        wait_for(lambda: admitted(proxy.url) == [node.url], timeout=60)
        yield proxy.url, node, server_pids(proxy.process.pid) + server_pids(node.process.pid)


def idle(node: RunningServer) -> bool:
    m = metrics(node.url)
    return m[RUNNING] == 0 and m[WAITING] == 0 and m[KV_FREE] == m[KV_TOTAL]


async def completed(url: str, n: int, concurrency: int = 16) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int) -> None:
            body = {"model": MODEL, "prompt": f"Once upon a time {i}", "max_tokens": 48, "ignore_eos": True}
            async with limit:
                assert (await client.post(f"{url}/v1/completions", json=body)).status_code == 200

        await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--proxy", action="store_true", help="through servekit proxy")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, target(Path(tmp), args.proxy) as (url, node, pids):
        asyncio.run(storm(url, 150, seed=1, model=MODEL))  # warm-up
        wait_until(lambda: idle(node), 120, "idle after warm-up")
        before = Resources.of(pids)
        started = time.monotonic()
        report = asyncio.run(storm(url, args.n, seed=args.seed, model=MODEL))
        took = time.monotonic() - started
        wait_until(lambda: idle(node), 300, "idle after the storm")
        settled_in = time.monotonic() - started - took
        after = Resources.of(pids)
        asyncio.run(completed(url, args.n))
        control = Resources.of(pids)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code
        kv = metrics(node.url)
        print(
            f"target: {'proxy -> serve' if args.proxy else 'serve'}; {args.n} streams in {took:.1f}s, cuts {dict(report.cuts)}"
        )
        print(
            f"idle (no request, KV {int(kv[KV_FREE])}/{int(kv[KV_TOTAL])} free) {settled_in:.1f}s after the last cut"
        )
        print(f"fds before {before.fds} after {after.fds}")
        print(
            f"rss before {before.rss / 2**20:.1f} MiB, after the storm {after.rss / 2**20:.1f} MiB "
            f"({(after.rss / before.rss - 1) * 100:+.1f}%), after {args.n} completed requests "
            f"{control.rss / 2**20:.1f} MiB ({(control.rss / after.rss - 1) * 100:+.1f}%)"
        )
        print(f"/health {healthy}")


if __name__ == "__main__":
    main()
