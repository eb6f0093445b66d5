"""Running schemathesis against a live server's /openapi.json, bounded and seeded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SEED = 17
MAX_EXAMPLES = 8
ROOT = Path(__file__).resolve().parents[2]
HOOKS = "tests.reliability.schemathesis_hooks"
# Every check runs, positive_data_acceptance too: /openapi.json carries the loaded model's bounds
# (servekit.specs.llm.schemas); the hooks drop only the rejections JSON Schema cannot express.


def schemathesis(
    url: str, tmp_path: Path, *extra: str, exclude: str | None = None, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "schemathesis"
    excluded = ["--exclude-checks", exclude] if exclude else []
    command = [
        str(executable),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        *excluded,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
        "--report-dir",
        str(tmp_path / "schemathesis-report"),
        *extra,
    ]
    # schemathesis runs in tmp_path: the hooks module and a relative PYTHONPATH (src) resolved here.
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join([str(ROOT), *inherited])
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": path}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
