"""Incremental detokenization: deltas never split a character and add up to the full decode."""

from __future__ import annotations

import random

import pytest
import torch

from servekit.llm.detokenizer import IncrementalDetokenizer
from servekit.llm.tokenizer import Tokenizer
from tests.llm.tiny_models import SAMPLE_TEXTS, build_sentencepiece_tokenizer_dir, build_tiny_checkpoint

torch.set_num_threads(1)

PROMPTS = ["", "Hello", "Answer in one word:", "数字", "emoji 🚀"]


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tiny_checkpoint(tmp_path_factory.mktemp("bl"), "llama"))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sp")))


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, bytelevel: Tokenizer, sentencepiece: Tokenizer) -> Tokenizer:
    return bytelevel if request.param == "bytelevel" else sentencepiece


def expected_continuation(
    tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int], skip: bool
) -> str:
    """The text the output adds after the prompt, from a full decode of both."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=skip)
    full_text = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas = []
    position = 0
    while position < len(ids):
        step = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add_tokens(ids[position : position + step]))
        position += step
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_add_up_and_never_split_characters(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt)
        for text in SAMPLE_TEXTS:
            output_ids = tokenizer.encode(text, add_special_tokens=False)
            detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
            deltas = stream(detok, output_ids, rng)
            for delta in deltas:
                assert "\ufffd" not in delta, (prompt, text, deltas)
            expected = expected_continuation(tokenizer, prompt_ids, output_ids, skip_special_tokens)
            assert "".join(deltas) == detok.text == expected, (prompt, text)
            assert detok.flush() == ""


def test_text_equals_decode_of_output_for_bytelevel(bytelevel: Tokenizer) -> None:
    for text in SAMPLE_TEXTS:
        output_ids = bytelevel.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(bytelevel, bytelevel.encode("prompt"))
        for token_id in output_ids:
            detok.add_tokens([token_id])
        assert detok.text == bytelevel.decode(output_ids)


def test_emoji_split_across_tokens_is_held_back(bytelevel: Tokenizer) -> None:
    ids = bytelevel.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the test needs an emoji that spans several tokens"
    detok = IncrementalDetokenizer(bytelevel, [])
    assert [detok.add_tokens([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add_tokens([ids[-1]]) == "🚀"


def test_sentencepiece_byte_fallback_and_spaces(sentencepiece: Tokenizer) -> None:
    prompt_ids = sentencepiece.encode("Hello")
    output_ids = sentencepiece.encode("world 😀 ok", add_special_tokens=False)
    assert "<0xF0>" in [sentencepiece.id_to_token(i) for i in output_ids]
    detok = IncrementalDetokenizer(sentencepiece, prompt_ids)
    deltas = [detok.add_tokens([i]) for i in output_ids]
    # The leading "▁" of the first output token is a space after the prompt, not dropped.
    assert "".join(deltas) == " world 😀 ok"
    assert " 😀" in deltas or "😀" in deltas


def test_special_tokens_skipped_or_kept(bytelevel: Tokenizer) -> None:
    im_end = bytelevel.token_to_id("<|im_end|>")
    assert im_end is not None
    ids = [*bytelevel.encode("Hi", add_special_tokens=False), im_end]
    skipping = IncrementalDetokenizer(bytelevel, [], skip_special_tokens=True)
    assert "".join(skipping.add_tokens([i]) for i in ids) == "Hi"
    keeping = IncrementalDetokenizer(bytelevel, [], skip_special_tokens=False)
    assert "".join(keeping.add_tokens([i]) for i in ids) == "Hi<|im_end|>"


def test_random_token_streams_match_full_decode(bytelevel: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        output_ids = [rng.randrange(bytelevel.vocab_size) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(bytelevel, [])
        deltas = stream(detok, output_ids, rng)
        for delta in deltas:
            assert not delta.endswith("\ufffd")
        deltas.append(detok.flush())
        assert "".join(deltas) == detok.text == bytelevel.decode(output_ids)


def test_empty_step_and_long_stream(bytelevel: Tokenizer) -> None:
    detok = IncrementalDetokenizer(bytelevel, [])
    assert detok.add_tokens([]) == ""
    text = " ".join(SAMPLE_TEXTS) * 5
    ids = bytelevel.encode(text, add_special_tokens=False)
    for token_id in ids:
        detok.add_tokens([token_id])
    assert detok.text == bytelevel.decode(ids)
