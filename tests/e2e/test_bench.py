"""`servekit bench` against a tiny-model `servekit serve`: the report, its JSON and its plot."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serving import REPO, RunningServer, serve_script, tiny_checkpoint
from tests.e2e.test_core_ops import scrape, value

pytestmark = pytest.mark.timeout(300)

SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "512"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model = tiny_checkpoint(tmp_path_factory)
    with serve_script("llm_serve.py", tmp_path_factory.mktemp("server"), SERVER_ENV, [str(model)]) as s:
        yield s


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "servekit.cli", "bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_bench_random_fixed_concurrency(server: RunningServer, tmp_path: Path) -> None:
    before = scrape(server.url)
    out = bench(
        "--base-url", server.url, "--num-prompts", "8", "--max-concurrency", "4",
        "--random-input-len", "16", "--random-output-len", "8", "--ignore-eos",
        "--json", "report.json", "--plot", "report.png", "--seed", "3",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Serving Benchmark Result" in out.stdout and "P99 TTFT (ms):" in out.stdout
    assert "requests" in out.stderr  # the progress bar
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["completed"] == 8 and report["failed"] == 0
    assert report["model"] == "tiny-llama" and report["max_concurrency"] == 4
    assert report["output_lens"] == [8] * 8  # ignore_eos: every request ran to its length
    assert report["total_output_tokens"] == 64
    after = scrape(server.url)
    # Token counts are the server's own (usage), as its metrics count them (warm-up included).
    served = value(after, "servekit:prompt_tokens_total") - value(before, "servekit:prompt_tokens_total")
    warmup_prompt = served - report["total_input_tokens"]
    assert 0 < warmup_prompt <= max(report["input_lens"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p50", "p90", "p99"):
            assert report[f"{stat}_{name}_ms"] > 0, (stat, name)
    assert report["p99_e2el_ms"] >= report["median_e2el_ms"] >= report["median_ttft_ms"]
    assert report["output_throughput"] == pytest.approx(64 / report["duration"])
    # One interval between consecutive content chunks: at most one per token after the first (a
    # random model's token may decode to no text yet).
    assert all(len(itls) <= 7 for itls in report["itls"])
    assert sum(map(len, report["itls"])) > 0
    assert all(len(t) == len(i) + 1 for t, i in zip(report["chunk_times"], report["itls"], strict=True))
    width, height = png_size(tmp_path / "report.png")
    assert (width, height) == (1200, 640)
    assert 20_000 < (tmp_path / "report.png").stat().st_size < 2_000_000


def test_bench_prefix_poisson_chat(server: RunningServer, tmp_path: Path) -> None:
    before = value(scrape(server.url), "servekit:prefix_cache_hits_total")
    out = bench(
        "--base-url", server.url, "--endpoint", "/v1/chat/completions", "--dataset-name", "prefix",
        "--prefix-len", "64", "--random-input-len", "8", "--random-output-len", "4",
        "--num-prompts", "6", "--request-rate", "20", "--json", "r.json", "--disable-tqdm",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["completed"] == 6 and report["request_rate"] == 20.0
    starts = report["start_times"]
    assert starts == sorted(starts) and starts[-1] > 0  # arrivals spread over time, not all at once
    # The shared prefix was served from the prefix cache.
    assert value(scrape(server.url), "servekit:prefix_cache_hits_total") - before >= 5 * 48


def test_bench_sharegpt_jsonl(server: RunningServer, tmp_path: Path) -> None:
    lines = [
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "a b c d e"}]},
        {"prompt": "Name a colour.", "completion": "Blue is one of them, surely"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = bench(
        "--base-url", server.url, "--dataset-name", "sharegpt", "--dataset-path", "data.jsonl",
        "--num-prompts", "4", "--ignore-eos", "--json", "r.json", "--disable-tqdm",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(report["output_lens"]) == [5, 5, 6, 6]  # the reference replies' word counts


def test_bench_bad_input(server: RunningServer, tmp_path: Path) -> None:
    bad_plot = bench("--base-url", server.url, "--plot", "out.jpg", cwd=tmp_path)
    assert bad_plot.returncode == 2 and "PNG" in bad_plot.stderr
    no_path = bench("--base-url", server.url, "--dataset-name", "sharegpt", cwd=tmp_path)
    assert no_path.returncode == 2 and "--dataset-path" in no_path.stderr
    unknown_model = bench(
        "--base-url", server.url, "--model", "nope", "--num-prompts", "1", "--disable-tqdm", cwd=tmp_path
    )
    assert unknown_model.returncode == 1 and "404" in unknown_model.stderr
    assert not (tmp_path / "out.jpg").exists()
