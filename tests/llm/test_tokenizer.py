"""The servekit tokenizer encodes and decodes exactly like transformers' fast tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from servekit.llm.tokenizer import Tokenizer
from tests.llm.tiny_models import (
    SAMPLE_TEXTS,
    build_sentencepiece_tokenizer_dir,
    build_tiny_checkpoint,
    reference_tokenizer,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("bytelevel"), "qwen2")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def tokenizer_dir(request: pytest.FixtureRequest, bytelevel_dir: Path, sentencepiece_dir: Path) -> Path:
    return bytelevel_dir if request.param == "bytelevel" else sentencepiece_dir


def test_encode_decode_match_transformers(tokenizer_dir: Path) -> None:
    ours = Tokenizer.from_dir(tokenizer_dir)
    reference = reference_tokenizer(tokenizer_dir)
    for text in SAMPLE_TEXTS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == reference.encode(text, add_special_tokens=add_special), text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            ), text


def test_special_token_ids_match_transformers(tokenizer_dir: Path) -> None:
    ours = Tokenizer.from_dir(tokenizer_dir)
    reference = reference_tokenizer(tokenizer_dir)
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.pad_token_id == reference.pad_token_id
    assert ours.bos_token == reference.bos_token
    assert ours.eos_token == reference.eos_token
    assert ours.vocab_size == len(reference)
    # A superset of transformers' (named) special ids: every added token flagged special, i.e.
    # exactly the ids that decode(skip_special_tokens=True) drops.
    assert ours.all_special_ids >= frozenset(reference.all_special_ids)
    dropped = {
        i
        for i in range(ours.vocab_size)
        if reference.decode([i], skip_special_tokens=True) == ""
        and reference.decode([i], skip_special_tokens=False) != ""
    }
    assert ours.all_special_ids == dropped
    for token_id in range(ours.vocab_size):
        assert ours.id_to_token(token_id) == reference.convert_ids_to_tokens(token_id)
    assert ours.id_to_token(ours.vocab_size + 10) is None


def test_sentencepiece_style_adds_bos_and_uses_byte_fallback(sentencepiece_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    ids = tokenizer.encode("hi 😀")
    assert ids[0] == tokenizer.bos_token_id
    assert "<0xF0>" in [tokenizer.id_to_token(i) for i in ids]
    assert tokenizer.decode(ids) == "hi 😀"


@pytest.mark.parametrize("keep_post_processor", [True, False])
def test_add_bos_token_flag_applies_without_post_processor(
    tmp_path: Path, bytelevel_dir: Path, keep_post_processor: bool
) -> None:
    import json
    import shutil

    shutil.copy(bytelevel_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tokenizer_json = json.loads((bytelevel_dir / "tokenizer.json").read_text())
    if not keep_post_processor:
        tokenizer_json["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    config["add_eos_token"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(tmp_path)
    ids = ours.encode("Hello there")
    plain = ours.encode("Hello there", add_special_tokens=False)
    if keep_post_processor:
        assert ids == reference_tokenizer(tmp_path).encode("Hello there")
        assert ids == plain
    else:
        # transformers 4's Llama tokenizer behaviour (transformers 5.23 drops the flags on load).
        assert ids == [ours.bos_token_id, *plain, ours.eos_token_id]


def test_eos_token_ids_merge_tokenizer_and_generation_config(bytelevel_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(bytelevel_dir, extra_eos_token_ids=[7, 7, 9])
    assert tokenizer.eos_token_id is not None
    assert tokenizer.eos_token_ids == [tokenizer.eos_token_id, 7, 9]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
