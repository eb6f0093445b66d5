"""deploy/Dockerfile.worker, parsed (Docker cannot run here): valid instructions, sources that exist,
extras that pyproject declares, torch pinned before the project, and the worker as its command."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile.worker"
KEYWORDS = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "CMD", "LABEL", "USER", "EXPOSE", "ENTRYPOINT"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(keyword, arguments) per instruction: continuation lines joined, comments dropped."""
    parsed: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        parsed.append((keyword, " ".join(arguments.split())))
        pending = ""
    assert not pending, "the last instruction ends with a line continuation"
    return parsed


def test_instructions_are_valid_and_in_order() -> None:
    parsed = instructions(DOCKERFILE.read_text())
    keywords = [keyword for keyword, _ in parsed]
    assert set(keywords) <= KEYWORDS
    assert all(k.isupper() for k in keywords)
    assert keywords[: keywords.index("FROM")] == ["ARG"] * keywords.index("FROM")  # only ARGs before FROM
    assert keywords.count("FROM") == 1 and keywords[-1] == "CMD"


def test_copied_sources_exist() -> None:
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source


def test_extras_exist_and_torch_comes_first() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runs = [arguments for keyword, arguments in instructions(DOCKERFILE.read_text()) if keyword == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "torch==" in run)
    [(project_step, wanted)] = [
        (i, match)
        for i, run in enumerate(runs)
        for match in re.findall(r'pip install "\.\[([a-z,]+)\]"', run)
    ]
    assert torch_step < project_step
    assert set(wanted.split(",")) <= set(extras) and {"llm", "runpod"} <= set(wanted.split(","))


def test_command_is_the_worker_in_exec_form() -> None:
    keyword, arguments = instructions(DOCKERFILE.read_text())[-1]
    assert keyword == "CMD"
    assert json.loads(arguments) == ["python", "-m", "servekit.integrations.runpod"]
    declared = {
        arguments.split("=")[0]
        for keyword, arguments in instructions(DOCKERFILE.read_text())
        if keyword == "ARG"
    }
    used = set(re.findall(r"\$\{(\w+)\}", DOCKERFILE.read_text()))
    assert used <= declared, used - declared
