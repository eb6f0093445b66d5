"""The prompts of a benchmark: random text of a given length, a shared prefix plus random text, or
a ShareGPT-style JSON / JSONL file.

Lengths are counted in words drawn from a list of short common English words, most of which are one
token in the usual BPE vocabularies; the report gives the token counts the server returned
(``usage``), not the requested lengths.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("random", "prefix", "sharegpt")

_WORDS_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call who oil "
    "its now find long down day did get come made may part over new sound take only little work know "
    "place year live me back give most very after thing our just name good sentence man think say "
    "great where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand picture "
    "again change off play spell air away animal house point page letter mother answer found study "
    "still learn should world high every near add food between own below country plant last school "
    "father keep tree never start city earth eye light thought head under story saw left few while "
    "along might close something seem next hard open example begin life"
)
_WORDS = tuple(_WORDS_TEXT.split())


@dataclass(frozen=True)
class BenchPrompt:
    prompt: str
    output_len: int


class DatasetError(ValueError):
    pass


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _length(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.randint(low, high)


def random_prompts(
    num: int, input_len: int, output_len: int, range_ratio: float, seed: int, prefix_len: int = 0
) -> list[BenchPrompt]:
    """``num`` prompts of about ``input_len`` random words after a shared prefix of ``prefix_len``."""
    if input_len < 1 or output_len < 1:
        raise DatasetError("--random-input-len and --random-output-len must be at least 1")
    if not 0 <= range_ratio < 1:
        raise DatasetError("--random-range-ratio must be in [0, 1)")
    rng = random.Random(seed)
    prefix = _words(rng, prefix_len) + " " if prefix_len else ""
    prompts = []
    for index in range(num):
        # A distinct number first, so no two prompts share more than the intended prefix.
        text = f"{prefix}{index} {_words(rng, _length(rng, input_len, range_ratio) - 1)}"
        prompts.append(BenchPrompt(text, _length(rng, output_len, range_ratio)))
    return prompts


def _conversation_pair(entry: Any) -> tuple[str, str | None] | None:
    """(prompt, reference reply) of one dataset entry: ShareGPT conversations, or prompt/completion."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations") or entry.get("messages")
    if isinstance(turns, list) and turns:
        texts = [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)]
        strings: list[str] = [t for t in texts if isinstance(t, str)]
        if strings:
            return strings[0], strings[1] if len(strings) > 1 else None
        return None
    prompt = entry.get("prompt")
    if isinstance(prompt, str):
        reply = entry.get("completion", entry.get("output"))
        return prompt, reply if isinstance(reply, str) else None
    return None


def file_prompts(path: Path, num: int, output_len: int | None, seed: int) -> list[BenchPrompt]:
    """Prompts of a ShareGPT JSON file (a list of entries) or a JSONL file (an entry a line); the
    output length is ``output_len``, else the reference reply's word count."""
    if not path.is_file():
        raise DatasetError(f"--dataset-path {path} is not a file")
    text = path.read_text()
    try:
        data = json.loads(text)
        entries = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path} is neither JSON nor JSONL: {error}") from None
    pairs = [p for p in map(_conversation_pair, entries) if p is not None and p[0].strip()]
    if not pairs:
        raise DatasetError(
            f"{path} has no usable entries: expected ShareGPT 'conversations' or 'prompt' fields"
        )
    rng = random.Random(seed)
    rng.shuffle(pairs)
    prompts = []
    for index in range(num):
        prompt, reply = pairs[index % len(pairs)]
        length = output_len or (max(4, len(reply.split())) if reply else 128)
        prompts.append(BenchPrompt(prompt, length))
    return prompts


def load_prompts(
    name: str,
    num: int,
    *,
    path: str | None,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    sharegpt_output_len: int | None,
    seed: int,
) -> list[BenchPrompt]:
    if num < 1:
        raise DatasetError("--num-prompts must be at least 1")
    if name == "random":
        return random_prompts(num, input_len, output_len, range_ratio, seed)
    if name == "prefix":
        if prefix_len < 1:
            raise DatasetError("--dataset-name prefix needs --prefix-len of at least 1")
        return random_prompts(num, input_len, output_len, range_ratio, seed, prefix_len)
    if name == "sharegpt":
        if path is None:
            raise DatasetError("--dataset-name sharegpt needs --dataset-path (a JSON or JSONL file)")
        return file_prompts(Path(path), num, sharegpt_output_len, seed)
    raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
