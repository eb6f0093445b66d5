"""A dead engine loop reports its worker unhealthy: its requests fail with 503, /health says 503 until
the supervisor has replaced the worker."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import health_after_restart, serve_script

pytestmark = pytest.mark.timeout(180)


def test_engine_death_restarts_worker(tmp_path: Path) -> None:
    from tests.llm.tiny_models import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / "tiny", "llama")
    env = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_TEST_ENGINE_FAIL_AFTER_STEPS": "3"}
    with serve_script("llm_serve.py", tmp_path, env=env, args=[str(model)]) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "ignore_eos": True}
        failed = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert failed.status_code == 503  # failed at once, through the supervisor
        assert "error" in failed.json()
        statuses = health_after_restart(server.url, timeout=90)
        assert 503 in statuses and statuses[-1] == 200
        ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200  # the restarted worker serves again (2 tokens: 2 steps)
