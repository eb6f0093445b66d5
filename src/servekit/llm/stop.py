"""When a sequence stops, and how much of its text a stream may show yet (vLLM semantics).

Everything works on decoded text (``str``), so a cut never splits a multibyte character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from servekit.llm.sampling_params import SamplingParams


@dataclass
class StopDecision:
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | None
    stop_reason: str | int | None = (
        None  # the stop string or stop token id that matched (None for eos/length)
    )
    text_end: int | None = None  # cut the output text here; None: keep it all


NOT_FINISHED = StopDecision(False)


def effective_max_tokens(params: SamplingParams, prompt_len: int, max_model_len: int) -> int:
    """``params.max_tokens`` bounded by the context left after the prompt (None: all of it)."""
    room = max(max_model_len - prompt_len, 0)
    return room if params.max_tokens is None else min(params.max_tokens, room)


def check_stop(
    params: SamplingParams,
    output_token_ids: Sequence[int],
    text: str,
    new_text_len: int,
    eos_token_ids: Sequence[int],
    max_tokens: int,
) -> StopDecision:
    """Decide whether a sequence is finished after its newest token.

    ``text`` is the whole output text so far and its last ``new_text_len`` characters came with the
    newest token. Checks, in vLLM's order: eos (unless ignore_eos), stop_token_ids, stop strings,
    then length. Nothing but the length limit stops a sequence before ``min_tokens``. The eos or stop
    token stays in the token ids; its text (only present when special tokens are not skipped, or for
    an ordinary stop token) is cut unless ``include_stop_str_in_output``.
    """
    num_tokens = len(output_token_ids)
    if num_tokens == 0:
        return NOT_FINISHED
    if num_tokens >= params.min_tokens:
        last_token = output_token_ids[-1]
        if last_token in params.stop_token_ids or (not params.ignore_eos and last_token in eos_token_ids):
            return StopDecision(
                finished=True,
                finish_reason="stop",
                stop_reason=last_token if last_token in params.stop_token_ids else None,
                text_end=_stop_token_text_end(params, text, new_text_len),
            )
        if params.stop and new_text_len > 0:
            match = _find_stop_string(params, text, new_text_len)
            if match is not None:
                stop_string, text_end = match
                return StopDecision(True, "stop", stop_string, text_end)
    if num_tokens >= max_tokens:
        return StopDecision(True, "length", None, None)
    return NOT_FINISHED


def _stop_token_text_end(params: SamplingParams, text: str, new_text_len: int) -> int | None:
    if params.include_stop_str_in_output or new_text_len <= 0:
        return None
    return max(len(text) - new_text_len, 0)


def _find_stop_string(params: SamplingParams, text: str, new_text_len: int) -> tuple[str, int] | None:
    """The earliest stop string that the new text completes, and where to cut the output."""
    best: tuple[int, str] | None = None
    for stop_string in params.stop:
        # Only an occurrence that ends inside the new text is new; earlier ones were checked before.
        search_from = max(len(text) - new_text_len - len(stop_string) + 1, 0)
        index = text.find(stop_string, search_from)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_string)
    if best is None:
        return None
    index, stop_string = best
    text_end = index + len(stop_string) if params.include_stop_str_in_output else index
    return stop_string, text_end


def stream_holdback(params: SamplingParams, text: str) -> int:
    """How many characters at the end of ``text`` a stream must hold back for now.

    They are the longest tail of ``text`` that is the beginning of a stop string: if the stop string
    completes later, that tail is cut from the output, so it must not have been streamed. Nothing is
    held back when stop strings are kept in the output.
    """
    if not params.stop or params.include_stop_str_in_output:
        return 0
    longest = 0
    for stop_string in params.stop:
        for length in range(min(len(stop_string) - 1, len(text)), longest, -1):
            if text.endswith(stop_string[:length]):
                longest = length
                break
    return longest
