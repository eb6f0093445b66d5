"""servekit dockerize: the Dockerfile, requirements.txt and .dockerignore it writes (Docker itself
cannot run on these machines: the files are checked as text)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import servekit
from servekit.cli import main
from servekit.dockerize import imported_modules

REPO = Path(__file__).resolve().parents[2]

SERVER = """\
import os
import numpy as np
from PIL import Image
import helpers
from servekit_missing_module.sub import thing
import servekit as ls
from . import sibling_if_package
"""

INSTRUCTIONS = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "EXPOSE", "HEALTHCHECK", "CMD"}


def _instructions(dockerfile: str) -> list[str]:
    """The instruction keyword of each logical line (continuations joined, comments dropped)."""
    logical = dockerfile.replace("\\\n", " ").splitlines()
    return [line.split()[0] for line in logical if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def server_file(tmp_path: Path) -> Path:
    (tmp_path / "helpers.py").write_text("")
    path = tmp_path / "my_server.py"
    path.write_text(SERVER)
    return path


def test_dockerize_writes_a_cpu_dockerfile_and_requirements(
    server_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dockerize", str(server_file), "--port", "9000"]) == 0
    context = server_file.parent
    dockerfile = (context / "Dockerfile").read_text()
    assert set(_instructions(dockerfile)) <= INSTRUCTIONS
    assert _instructions(dockerfile)[:2] == ["ARG", "FROM"]
    assert "FROM python:${PYTHON_VERSION}-slim" in dockerfile
    assert (
        f"pip install --no-cache-dir servekit=={servekit.__version__} -r /app/requirements.txt" in dockerfile
    )
    assert "EXPOSE 9000\n" in dockerfile
    assert "http://127.0.0.1:9000/health" in dockerfile
    assert dockerfile.rstrip().endswith('CMD ["python", "/app/my_server.py"]')
    assert "nvidia" not in dockerfile and "--gpus" not in dockerfile

    requirements = (context / "requirements.txt").read_text().splitlines()
    assert f"numpy=={importlib.metadata.version('numpy')}" in requirements
    assert any(line.lower() == f"pillow=={importlib.metadata.version('pillow')}" for line in requirements)
    assert "# servekit_missing_module: not installed here; add the package that provides it" in requirements
    # Only the third-party packages: not the standard library, local modules or servekit.
    pinned = [line for line in requirements if not line.startswith("#")]
    assert sorted(line.split("==")[0].lower() for line in pinned) == ["numpy", "pillow"]
    assert ".venv" in (context / ".dockerignore").read_text()

    out = capsys.readouterr().out
    assert "docker build -t my-server" in out
    assert "docker run -p 9000:9000 my-server" in out


def test_dockerize_gpu_keeps_existing_files_and_refuses_to_overwrite(server_file: Path) -> None:
    context = server_file.parent
    (context / "requirements.txt").write_text("torch==2.13.0\n")
    assert main(["dockerize", str(server_file), "--gpu"]) == 0
    dockerfile = (context / "Dockerfile").read_text()
    assert _instructions(dockerfile)[0] == "FROM"
    assert "FROM nvidia/cuda:" in dockerfile
    assert "python3 -m venv /opt/venv" in dockerfile
    assert "`servekit dockerize my_server.py --gpu`" in dockerfile
    assert "docker run --gpus all -p 8000:8000 my-server" in dockerfile
    assert "EXPOSE 8000\n" in dockerfile
    assert (context / "requirements.txt").read_text() == "torch==2.13.0\n"  # the user's, untouched

    # A second run would overwrite the Dockerfile: only with --force.
    assert main(["dockerize", str(server_file)]) == 2
    assert "nvidia" in (context / "Dockerfile").read_text()
    assert main(["dockerize", str(server_file), "--force"]) == 0
    assert "nvidia" not in (context / "Dockerfile").read_text()


def test_dockerize_errors_and_the_console_command(tmp_path: Path) -> None:
    assert main(["dockerize", str(tmp_path / "missing.py")]) == 2
    script = tmp_path / "app.py"
    script.write_text("import servekit\n")
    done = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "dockerize", "app.py", "--port", "8123"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "EXPOSE 8123" in (tmp_path / "Dockerfile").read_text()


def test_imported_modules() -> None:
    assert imported_modules(SERVER) == [
        "os",
        "numpy",
        "PIL",
        "helpers",
        "servekit_missing_module",
        "servekit",
    ]


def test_requirements_drop_local_version_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from servekit import dockerize

    monkeypatch.setattr(dockerize.importlib.metadata, "version", lambda name: "2.13.0+cpu")
    script = tmp_path / "s.py"
    script.write_text("import numpy\n")
    assert dockerize.requirements(script) == ["numpy==2.13.0"]
