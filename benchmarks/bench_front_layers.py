"""The serving core front's own middleware, in microseconds per request, in this process (no sockets,
no workers): each layer around a trivial ASGI app that answers one small JSON body, and the whole
stack as `servekit serve` and LitServer build it (header limit, request observer, body limit, gzip),
with Starlette's GZipMiddleware as the baseline measured in the same run.

    .venv/bin/python benchmarks/bench_front_layers.py [--requests 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.middleware.gzip import GZipMiddleware

from servekit.cpu import cpu_model
from servekit.http.compression import gzip_middleware
from servekit.http.limits import MaxBodySizeMiddleware, MaxHeaderSizeMiddleware
from servekit.http.metrics import HTTPMetrics
from servekit.http.request_log import RequestObserver

App = Callable[..., Any]
BODY = b'{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" a"}]}'
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", b"Python/3.11 aiohttp/3.14"),
    (b"content-length", b"60"),
    (b"content-type", b"application/json"),
]


async def answer(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"x" * 60, "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def stacks() -> Iterator[tuple[str, App]]:
    lazy, options = gzip_middleware()

    def front(gzip: App) -> App:
        inner = MaxBodySizeMiddleware(gzip, 1 << 26)
        return MaxHeaderSizeMiddleware(RequestObserver(inner, HTTPMetrics(), access_log=False))

    yield "bare app", answer
    yield "gzip (Starlette's)", GZipMiddleware(answer, **options)
    yield "gzip (servekit's lazy)", lazy(answer, **options)
    yield "request observer", RequestObserver(answer, HTTPMetrics(), access_log=False)
    yield "body + header limits", MaxHeaderSizeMiddleware(MaxBodySizeMiddleware(answer, 1 << 26))
    yield "whole stack, Starlette's gzip", front(GZipMiddleware(answer, **options))
    yield "whole stack, lazy gzip", front(lazy(answer, **options))


async def per_request(app: App, requests: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(requests):
            scope = {"type": "http", "method": "POST", "path": "/predict", "headers": HEADERS}
            await app(scope, receive, send)
        best = min(best, (time.perf_counter() - started) / requests)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {name: asyncio.run(per_request(app, args.requests, args.repeats)) for name, app in stacks()}
    bare = results["bare app"]
    print(
        f"CPU: {cpu_model()}; load average: {os.getloadavg()[0]:.1f}; best of {args.repeats} x {args.requests}"
    )
    print("| layers | us per request | added to the bare app (us) |")
    print("|---|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e6:.1f} | {(seconds - bare) * 1e6:+.1f} |")


if __name__ == "__main__":
    main()
