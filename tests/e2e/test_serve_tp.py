"""`servekit serve --tp 2` on CPU (gloo): the split model answers the openai client as the whole one
does; a rank process that is SIGKILLed takes its worker down cleanly (the running stream ends with
an error, /health says 503 until the supervisor has a new worker with new ranks) and no rank
outlives the server."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from servekit.llm import EngineConfig, LLMEngine, SamplingParams
from tests.e2e.serving import RunningServer, health_after_restart, serve_script

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SERVER_ENV = {
    "SERVEKIT_NUM_THREADS": "2",
    "SERVEKIT_MAX_MODEL_LEN": "512",
    "SERVEKIT_KV_CACHE_MEMORY": "4MiB",
}
PROMPT = "Once upon a time, there was a small model"


def rank_pids(server: RunningServer) -> list[int]:
    """Tensor-parallel rank processes of the server's session (it runs in a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        session = int(stat.rpartition(")")[2].split()[3])
        state = stat.rpartition(")")[2].split()[0]
        if b"servekit.llm.tp_rank" in cmdline and session == server.process.pid and state != "Z":
            found.append(int(entry))
    return found


def wait_for_ranks(server: RunningServer, exclude: set[int], timeout: float = 90.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in rank_pids(server) if pid not in exclude]
        if pids:
            return pids
        time.sleep(0.1)  # polling /proc for a process the server starts, bounded by the deadline
    raise TimeoutError("no tensor-parallel rank process appeared")


def test_serve_tp2_answers_and_survives_a_killed_rank(tmp_path: Path) -> None:
    from tests.llm.tiny_models import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / "tiny", "llama")
    whole = LLMEngine(EngineConfig(model=str(model), max_model_len=512, num_kv_blocks=64, num_threads=1))
    whole.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    expected = ""
    while whole.has_unfinished_requests():
        for output in whole.step():
            expected = output.outputs[0].text

    with serve_script("llm_serve.py", tmp_path, env=SERVER_ENV, args=[str(model), "--tp", "2"]) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        completion = client.completions.create(
            model=client.models.list().data[0].id,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert completion.choices[0].text == expected
        chat = client.chat.completions.create(
            model=completion.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert chat.choices[0].message.content

        (rank,) = wait_for_ranks(server, exclude=set())
        body = {"prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            os.kill(rank, signal.SIGKILL)
            events.extend(line[6:] for line in lines if line.startswith("data: "))
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2])  # the stream ended early, with an error
        assert len(events) < 450

        statuses = health_after_restart(server.url, timeout=120)
        assert 503 in statuses and statuses[-1] == 200
        (new_rank,) = wait_for_ranks(server, exclude={rank})
        again = client.completions.create(
            model=completion.model,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert again.choices[0].text == expected

        assert server.stop() is not None
        deadline = time.monotonic() + 30
        while rank_pids(server) and time.monotonic() < deadline:
            time.sleep(0.05)  # the ranks exit with their worker, bounded by the deadline
        assert rank_pids(server) == [], f"rank {new_rank} outlived its server"
