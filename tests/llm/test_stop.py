"""Stop conditions and stream holdback, driven the way the engine drives them (token by token)."""

from __future__ import annotations

import random

import pytest

from servekit.llm.sampling_params import SamplingParams
from servekit.llm.stop import StopDecision, check_stop, effective_max_tokens, stream_holdback

EOS = [0, 99]


def run(
    pieces: list[str], params: SamplingParams, max_tokens: int = 100, token_ids: list[int] | None = None
) -> tuple[StopDecision, str, int]:
    """Feed text pieces (one per token) until a stop; return (decision, final text, tokens used)."""
    ids = token_ids or [10 + i for i in range(len(pieces))]
    text = ""
    for count, piece in enumerate(pieces, start=1):
        text += piece
        decision = check_stop(params, ids[:count], text, len(piece), EOS, max_tokens)
        if decision.finished:
            final = text if decision.text_end is None else text[: decision.text_end]
            return decision, final, count
    return StopDecision(False), text, len(pieces)


def test_not_finished() -> None:
    decision, text, used = run(["Hello", " world"], SamplingParams(stop=["xyz"]))
    assert not decision.finished and decision.finish_reason is None
    assert (text, used) == ("Hello world", 2)


def test_eos_stops_with_no_stop_reason() -> None:
    decision, text, used = run(["a", "b", ""], SamplingParams(), token_ids=[5, 6, 99])
    assert (decision.finished, decision.finish_reason, decision.stop_reason) == (True, "stop", None)
    assert (text, used) == ("ab", 3)


def test_eos_text_is_cut_when_special_tokens_are_shown() -> None:
    params = SamplingParams(skip_special_tokens=False)
    decision, text, _ = run(["a", "b", "</s>"], params, token_ids=[5, 6, 0])
    assert decision.finish_reason == "stop" and text == "ab"
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    _, text, _ = run(["a", "b", "</s>"], params, token_ids=[5, 6, 0])
    assert text == "ab</s>"


def test_ignore_eos() -> None:
    decision, _, used = run(
        ["a", "", "b"], SamplingParams(ignore_eos=True), max_tokens=3, token_ids=[5, 0, 6]
    )
    assert decision.finish_reason == "length" and used == 3


def test_nothing_but_length_stops_before_min_tokens() -> None:
    params = SamplingParams(min_tokens=4, stop=["b"], stop_token_ids=[7])
    decision, text, used = run(["b", "", "x", "b"], params, token_ids=[5, 0, 7, 6])
    assert (decision.stop_reason, text, used) == ("b", "bx", 4)
    # the context limit still wins over min_tokens
    decision, _, used = run(["a", "a", "a"], SamplingParams(min_tokens=3), max_tokens=2)
    assert (decision.finish_reason, used) == ("length", 2)


def test_stop_token_id_is_reported_and_its_text_cut() -> None:
    decision, text, used = run(["a", "b", "c"], SamplingParams(stop_token_ids=[11]), token_ids=[5, 11, 6])
    assert (decision.finish_reason, decision.stop_reason, text, used) == ("stop", 11, "a", 2)


def test_length() -> None:
    decision, text, used = run(["a", "b", "c", "d"], SamplingParams(), max_tokens=3)
    assert (decision.finish_reason, decision.stop_reason, decision.text_end) == ("length", None, None)
    assert (text, used) == ("abc", 3)


def test_stop_string_across_token_boundaries() -> None:
    params = SamplingParams(stop=["STOP here"])
    decision, text, used = run(["Go", " ST", "O", "P h", "ere", " and more"], params)
    assert (decision.finish_reason, decision.stop_reason, text, used) == ("stop", "STOP here", "Go ", 5)


def test_stop_string_inside_one_token_cuts_the_rest() -> None:
    decision, text, used = run(["ab", "c\n\nde", "f"], SamplingParams(stop=["\n\n"]))
    assert (decision.stop_reason, text, used) == ("\n\n", "abc", 2)


def test_include_stop_str_in_output() -> None:
    params = SamplingParams(stop=["\n\n"], include_stop_str_in_output=True)
    decision, text, _ = run(["ab", "c\n\nde", "f"], params)
    assert (decision.stop_reason, text) == ("\n\n", "abc\n\n")


def test_earliest_stop_string_wins() -> None:
    params = SamplingParams(stop=["world", "lo"])
    decision, text, _ = run(["hel", "lo world"], params)
    assert (decision.stop_reason, text) == ("lo", "hel")


def test_unicode_stop_strings() -> None:
    params = SamplingParams(stop=["世界"])
    decision, text, used = run(["héllo ", "世", "界!", "more"], params)
    assert (decision.stop_reason, text, used) == ("世界", "héllo ", 3)
    params = SamplingParams(stop=["🙂 bye"], include_stop_str_in_output=True)
    _, text, _ = run(["ok ", "🙂", " b", "ye now"], params)
    assert text == "ok 🙂 bye"


def test_only_new_text_is_searched() -> None:
    # an occurrence entirely inside old text (e.g. before min_tokens) is not matched again later
    params = SamplingParams(stop=["ab"])
    text = "xxabyy"
    assert not check_stop(params, [1, 2, 3], text, 2, EOS, 100).finished
    assert check_stop(params, [1, 2, 3], text, 3, EOS, 100).stop_reason == "ab"


@pytest.mark.parametrize(
    ("stop", "text", "expected"),
    [
        (["</s>"], "hello </", 2),
        (["</s>"], "hello <", 1),
        (["</s>"], "hello", 0),
        (["</s>"], "", 0),
        (["abc", "bcd"], "xxabc", 2),  # "bc" could start "bcd"
        (["abcd", "cx"], "zabc", 3),
        (["世界"], "你好世", 1),
        (["aaa"], "aa", 2),
    ],
)
def test_stream_holdback(stop: list[str], text: str, expected: int) -> None:
    assert stream_holdback(SamplingParams(stop=stop), text) == expected


def test_no_holdback_when_stop_strings_are_kept_or_absent() -> None:
    assert stream_holdback(SamplingParams(stop=["</s>"], include_stop_str_in_output=True), "a </") == 0
    assert stream_holdback(SamplingParams(), "a </") == 0


def test_streaming_with_holdback_never_emits_text_that_is_cut_later() -> None:
    rng = random.Random(0)
    alphabet = "ab c世\n"
    stops = ["b c", "世\n", "cc a"]
    for _ in range(300):
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        cuts = sorted(rng.sample(range(1, len(full)), min(len(full) - 1, rng.randint(0, 8))))
        pieces = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)], strict=True)]
        params = SamplingParams(stop=stops)
        text, streamed = "", ""
        final = None
        for count, piece in enumerate(pieces, start=1):
            text += piece
            decision = check_stop(params, list(range(count)), text, len(piece), [], 1000)
            if decision.finished:
                final = text[: decision.text_end]
                break
            visible = text[: len(text) - stream_holdback(params, text)]
            assert visible.startswith(streamed)
            streamed = visible
        if final is None:
            final = text
        assert final.startswith(streamed), (pieces, streamed, final)
        first = min((i for i in (full.find(s) for s in stops) if i != -1), default=len(full))
        assert final == full[:first]


def test_effective_max_tokens() -> None:
    assert effective_max_tokens(SamplingParams(max_tokens=16), 10, 100) == 16
    assert effective_max_tokens(SamplingParams(max_tokens=160), 10, 100) == 90
    assert effective_max_tokens(SamplingParams(max_tokens=None), 10, 100) == 90
