"""What the engine hands back per request: vLLM-style ``RequestOutput`` and ``CompletionOutput``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servekit.llm.tokenizer import Tokenizer


@dataclass
class Logprob:
    """The log-probability of one token; ``rank`` is 1 for the most likely token (None if unknown)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated (or prompt) token: token id -> its Logprob. The sampled token is always in it.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


def logprob_entry(
    tokenizer: Tokenizer, token_id: int, logprob: float, top: Sequence[tuple[int, float]]
) -> dict[int, Logprob]:
    """The logprobs entry of one generated token: its ``top`` alternatives ranked, the token first if
    it is not among them."""
    entry: dict[int, Logprob] = {}
    for rank, (tid, value) in enumerate(top, start=1):
        entry[tid] = Logprob(value, rank, tokenizer.decode([tid], skip_special_tokens=False))
    if token_id not in entry:
        entry = {
            token_id: Logprob(logprob, None, tokenizer.decode([token_id], skip_special_tokens=False)),
            **entry,
        }
    return entry


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    ``text`` and ``token_ids`` are cumulative; ``text_delta`` and ``token_ids_delta`` are what is new
    since the previous output of the same request (for streaming). While a stop string may still be
    forming, its first characters are held back from ``text``/``text_delta``; they never appear in a
    stream when the stop string completes.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: SampleLogprobs | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life, and its prefix-cache use."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first sequence)
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    @property
    def num_cached_tokens(self) -> int:
        return 0 if self.metrics is None else self.metrics.num_cached_tokens
