"""The playground in headless Chromium (playwright-core driving Debian's chromium): behind an API
key, a streamed reply, and a stop button that makes the server stop generating."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.serving import REPO, RunningServer, serve_script, tiny_checkpoint
from tests.e2e.test_core_ops import scrape, value

pytestmark = pytest.mark.timeout(240)

BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "playground-key-123"
SERVER_ENV = {
    "SERVEKIT_NUM_THREADS": "1",
    "SERVEKIT_MAX_MODEL_LEN": "512",
    "SERVEKIT_API_KEY": KEY,
    "SERVEKIT_TEST_ENGINE_STEP_DELAY_S": "0.03",  # a long reply takes seconds: time to press stop
}


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: run npm ci in tests/browser (.ci/run does)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("SERVEKIT_REQUIRE_BROWSER") == "1":  # CI (.ci/run) installs all of it
            pytest.fail(f"the browser test cannot run: {missing}")
        pytest.skip(missing)
    model = tiny_checkpoint(tmp_path_factory)
    with serve_script("llm_serve.py", tmp_path_factory.mktemp("server"), SERVER_ENV, [str(model)]) as s:
        yield s


def test_static_files_are_packaged_and_open(server: RunningServer) -> None:
    page = httpx.get(f"{server.url}/playground")  # no key needed: the page asks for it
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{server.url}/playground/{name}").status_code == 200
        assert f"/playground/{name}" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere (no CDN)
    assert httpx.get(f"{server.url}/playground/../pyproject.toml").status_code == 404
    assert httpx.get(f"{server.url}/playground/secret.py").status_code == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself stays closed


def test_playground_in_chromium(server: RunningServer, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    aborted_before = value(scrape_with_key(server), "servekit:num_aborted_requests_total")
    screenshot = tmp_path / "playground.png"
    run = subprocess.run(
        ["node", str(BROWSER_DIR / "playground.mjs"), server.url, KEY, str(screenshot)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )
    assert run.returncode == 0, run.stderr + run.stdout
    seen = json.loads(run.stdout.strip().splitlines()[-1])

    assert seen["landed"].endswith("/playground")
    assert "API key" in seen["askedForKey"]
    assert seen["storedKey"] == KEY and seen["modelsAfterReload"] == len(seen["models"]) >= 1
    models = httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"]
    assert seen["models"] == [m["id"] for m in models]

    first = seen["firstReply"]
    assert first["done"] == "true" and first["text"].strip()
    assert first["user"] == "Say hello in **bold**"  # the user's text is shown as typed
    assert first["ttft"].endswith(" ms") and first["tokens"] == "12"
    assert float(first["tps"]) > 0

    assert seen["runningBeforeStop"] >= 1 and seen["stopEnabled"]
    assert seen["runningAfterStop"] == 0
    assert seen["stoppedText"] and not seen["grewAfterStop"] and seen["sendEnabledAfterStop"]
    after = scrape_with_key(server)
    assert value(after, "servekit:num_aborted_requests_total") == aborted_before + 1
    assert value(after, "servekit:request_success_total", finished_reason="length") >= 1

    html = seen["markdown"]
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html and "<ul><li>one</li><li>two</li></ul>" in html
    assert "<pre><code>if (a &lt; b) {}</code></pre>" in html
    assert 'href="https://example.org"' in html and "javascript:" not in html.split("[bad]")[0]
    assert 'href="javascript' not in html

    assert seen["external"] == []  # works offline: every request went to the server
    assert [e for e in seen["consoleErrors"] if "401" not in e] == []
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def scrape_with_key(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return scrape(server.url, headers={"Authorization": f"Bearer {KEY}"})
