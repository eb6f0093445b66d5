"""deploy/Dockerfile.serve and Dockerfile.serve-cuda, parsed (Docker cannot run here): the command,
its flags (checked against `servekit serve --help`), the env settings, the port of EXPOSE, the
command and the health check agree, and what they copy and install exists."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from servekit.llm.config import EngineConfig
from servekit.settings import settings_of
from servekit.specs.llm.config import ServeConfig
from tests.unit.test_dockerfile_worker import KEYWORDS, instructions

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "deploy" / "Dockerfile.serve", REPO / "deploy" / "Dockerfile.serve-cuda"]


@pytest.fixture(scope="module")
def serve_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def env_of(parsed: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in parsed:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_instructions_sources_and_extras(dockerfile: Path) -> None:
    parsed = instructions(dockerfile.read_text())
    keywords = [k for k, _ in parsed]
    assert set(keywords) <= KEYWORDS | {"HEALTHCHECK", "VOLUME"}
    assert keywords[: keywords.index("FROM")] == ["ARG"] * keywords.index("FROM")
    assert keywords[-1] == "CMD"
    for keyword, arguments in parsed:
        if keyword == "COPY":
            *sources, _ = arguments.split()
            assert all((REPO / s).exists() for s in sources), arguments
    declared = {a.split("=")[0] for k, a in parsed if k == "ARG"}
    assert set(re.findall(r"\$\{(\w+)\}", dockerfile.read_text())) <= declared
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runs = " ".join(a for k, a in parsed if k == "RUN")
    wanted = re.findall(r'pip install "\.\[([a-z,]+)\]"', runs)
    assert wanted and all(set(w.split(",")) <= set(extras) for w in wanted)
    assert runs.index("torch==") < runs.index('pip install ".[')  # torch from its own index first


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_command_flags_env_and_ports_exist(dockerfile: Path, serve_help: str) -> None:
    parsed = instructions(dockerfile.read_text())
    command = json.loads(parsed[-1][1])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[:2] == ["servekit", "serve"] and "servekit" in scripts
    flags = [part for part in command if part.startswith("--")]
    assert flags
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}[\s,]", serve_help), f"{flag} is not a serve flag"
    port = command[command.index("--port") + 1]
    [exposed] = [a for k, a in parsed if k == "EXPOSE"]
    assert exposed == port
    [health] = [a for k, a in parsed if k == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{port}/health" in health
    env = env_of(parsed)
    known = {name for cls in (EngineConfig, ServeConfig) for s in settings_of(cls) for name in s.env_names}
    for name in env:
        if name.startswith("SERVEKIT_"):
            assert name in known, f"{name} is no servekit serve setting"
    assert env["SERVEKIT_PORT"] == port and env["SERVEKIT_LOG_FORMAT"] in ("text", "json")
    # The model comes from the /models volume (a path, or a hub id through the cache there).
    assert '["/models"]' in [a for k, a in parsed if k == "VOLUME"]
    assert env["HF_HUB_CACHE"].startswith("/models")
    usage = dockerfile.read_text()
    for setting in re.findall(r"-e (SERVEKIT_\w+)=", usage):
        assert setting in known, setting
