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
# positive_data_acceptance expects every schema-valid body to be accepted; against a loaded model,
# what only the model can check (chat-template roles, vocabulary, context length, an empty prompt's
# zero tokens) is a 400 no static schema knows, so those runs exclude it.
MODEL_CHECKED = "positive_data_acceptance"


def schemathesis(
    url: str, tmp_path: Path, *extra: str, exclude: str | None = MODEL_CHECKED, timeout: float = 240
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
