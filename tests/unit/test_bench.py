"""servekit bench's pieces without a server: percentiles, arrivals, datasets, the report's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from servekit.bench.datasets import DatasetError, load_prompts
from servekit.bench.report import percentile, summarize
from servekit.bench.runner import LoadSettings, RequestResult, arrival_gaps, request_body


def test_percentile_matches_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (1, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) == 0.0


def test_poisson_arrivals_have_the_rate() -> None:
    gaps = arrival_gaps(5000, rate=4.0, burstiness=1.0, seed=1)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert np.std(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: std = mean
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    assert arrival_gaps(10, 2.0, 1.0, 7) == arrival_gaps(10, 2.0, 1.0, 7)  # seeded


def test_datasets(tmp_path: Path) -> None:
    common = {
        "path": None,
        "input_len": 20,
        "output_len": 7,
        "range_ratio": 0.0,
        "prefix_len": 0,
        "sharegpt_output_len": None,
    }
    prompts = load_prompts("random", 5, seed=0, **common)
    assert [len(p.prompt.split()) for p in prompts] == [20] * 5 and {p.output_len for p in prompts} == {7}
    assert len({p.prompt for p in prompts}) == 5
    prefixed = load_prompts("prefix", 3, seed=0, **{**common, "prefix_len": 10})
    heads = {" ".join(p.prompt.split()[:10]) for p in prefixed}
    assert len(heads) == 1 and all(len(p.prompt.split()) == 30 for p in prefixed)
    data = tmp_path / "share.json"
    data.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a b c d e f"}]}]
        )
    )
    [item] = load_prompts("sharegpt", 1, seed=0, **{**common, "path": str(data)})
    assert item.prompt == "q" and item.output_len == 6
    with pytest.raises(DatasetError, match="dataset-path"):
        load_prompts("sharegpt", 1, seed=0, **common)
    (tmp_path / "bad.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(DatasetError, match="no usable entries"):
        load_prompts("sharegpt", 1, seed=0, **{**common, "path": str(tmp_path / "bad.jsonl")})
    with pytest.raises(DatasetError, match="prefix-len"):
        load_prompts("prefix", 1, seed=0, **common)


def test_summary_figures() -> None:
    ok = RequestResult(ok=True, ttft=0.1, latency=1.0, prompt_tokens=10, output_tokens=10, itls=[0.1] * 9)
    failed = RequestResult(error="HTTP 500: boom")
    report = summarize([ok, ok, failed], 2.0, [50, 99], {"model": "m"})
    assert report["completed"] == 2 and report["failed"] == 1
    assert report["total_output_tokens"] == 20 and report["output_throughput"] == 10.0
    assert report["request_throughput"] == 1.0 and report["total_token_throughput"] == 20.0
    assert report["mean_ttft_ms"] == pytest.approx(100.0)
    assert report["mean_tpot_ms"] == pytest.approx(100.0)  # (1.0 - 0.1) / 9 tokens
    assert report["p99_itl_ms"] == pytest.approx(100.0) and report["errors"][2] == "HTTP 500: boom"


def test_request_body() -> None:
    settings = LoadSettings(
        "http://x", "/v1/chat/completions", "m", None, 1.0, 1.0, True, 0.0, 3, 10.0, extra_body={"top_k": 5}
    )
    from servekit.bench.datasets import BenchPrompt

    body = request_body(settings, BenchPrompt("hi", 4), 2)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_tokens"] == 4
    assert body["ignore_eos"] is True and body["seed"] == 5 and body["top_k"] == 5
    assert body["stream_options"] == {"include_usage": True}


def test_a_keep_alive_connection_closed_by_the_server_is_retried_once() -> None:
    """A server that serves one request per connection and drops the connection when a second
    request arrives on it (as llama-server's HTTP library does after its per-connection limit): every
    request still completes, each on a fresh connection, and none is sent twice to the same one."""
    import asyncio

    from servekit.bench.datasets import BenchPrompt
    from servekit.bench.runner import run_load

    stream = (
        b'data: {"choices":[{"text":"a"}]}\n\n'
        b'data: {"choices":[{"text":""}],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    answered: list[int] = []
    connections = iter(range(100))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = next(connections)
        for served in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            if served == 1:
                break  # the second request on this connection: close without a byte
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            answered.append(connection)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                + f"Content-Length: {len(stream)}\r\n\r\n".encode()
                + stream
            )
            await writer.drain()
        writer.close()

    async def scenario() -> list[RequestResult]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = LoadSettings(
            f"http://127.0.0.1:{port}", "/v1/completions", "m", 1, float("inf"), 1.0, True, 0.0, 0, 10.0
        )
        async with server:
            _, results, _ = await run_load(settings, [BenchPrompt("hi", 1)] * 4, num_warmups=1)
        return results

    results = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert [r.error for r in results] == [""] * 4 and all(r.ok for r in results)
    assert len(answered) == 5 and len(set(answered)) == 5  # the warm-up and 4 requests, one connection each
