"""Packed (oneDNN) projections keep RSS bounded however many input shapes they see: each row count
compiles a kernel, and the caches that keep them are capped before the first weight is packed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from servekit.llm.models.linear import ONEDNN_CACHE_ENV, onednn_available

# Runs in a fresh interpreter: the caches read their capacity once, when oneDNN first creates a kernel.
PROGRAM = """
import json, torch
from servekit.llm.models.linear import Linear
torch.set_num_threads(1)

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

linear = Linear(torch.randn(256, 64))
assert linear.packed is not None
figures = []
for rows in range(1, 401):
    linear(torch.randn(rows, 64))
    if rows in (200, 400):
        figures.append(rss_mib())
print(json.dumps(figures))
"""


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_distinct_row_counts_do_not_grow_rss() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    at_200, at_400 = json.loads(done.stdout)
    print(f"RSS after 200 shapes {at_200:.1f} MiB, after 400 {at_400:.1f} MiB")
    # Uncapped, each new shape adds 0.3-1 MB (about +100 MiB over these 200 shapes).
    assert at_400 - at_200 < 20, (at_200, at_400)
