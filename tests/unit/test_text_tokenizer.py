"""load_tokenizer / caption_tokens / decode_caption on a vocab made by build_vocab."""

from pathlib import Path

import pytest

from mengzi_ray.text import (
    build_vocab,
    caption_tokens,
    decode_caption,
    load_tokenizer,
    write_vocab,
)

TEXTS = ["猫在桌上", "狗在桌下", "Red bus 和 cat"]
# Ids by hand: 104 在, 105 桌 (count 2); then count 1 by code point:
# "bus" 106, "cat" 107, "red" 108, 上 109 (U+4E0A), 下 110, 和 111 (U+548C), 狗 112, 猫 113.
CAT_ID = 113


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_vocab(build_vocab(TEXTS), tmp_path / "vocab.txt")
    return tmp_path


def test_known_character_maps_to_its_vocab_line(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    lines = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[CAT_ID] == "猫"
    assert len(tokenizer) == 114
    assert tokenizer.convert_tokens_to_ids("猫") == CAT_ID
    assert tokenizer("猫")["input_ids"] == [101, CAT_ID, 102]


def test_cjk_characters_are_split_one_by_one(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    tokens = caption_tokens(tokenizer, "猫在桌上")
    assert tokens == ["猫", "在", "桌", "上"]
    assert tokenizer.convert_tokens_to_ids(tokens) == [113, 104, 105, 109]


def test_source_texts_have_no_unknown_tokens(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    for text in TEXTS:
        assert "[UNK]" not in caption_tokens(tokenizer, text)


def test_caption_tokens_normalises_first(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    assert caption_tokens(tokenizer, "  貓\u3000在桌上 ") == ["猫", "在", "桌", "上"]


def test_lower_casing_is_configurable(model_dir: Path) -> None:
    assert caption_tokens(load_tokenizer(model_dir), "RED Bus") == ["red", "bus"]
    cased = load_tokenizer(model_dir, do_lower_case=False)
    assert caption_tokens(cased, "RED bus") == ["[UNK]", "bus"]


def test_missing_vocab_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt") as excinfo:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_vocab_without_mask_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n猫\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[MASK\]") as excinfo:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "vocab.txt") in str(excinfo.value)


def test_vocab_with_duplicate_lines_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text(
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n猫\n猫\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"vocab\.txt"):
        load_tokenizer(tmp_path)


def test_decode_joins_cjk_without_spaces_and_drops_specials(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    # [CLS] 猫 在 [UNK] 桌 上 [SEP] [PAD] [MASK]
    assert decode_caption(tokenizer, [101, 113, 104, 100, 105, 109, 102, 0, 103]) == "猫在桌上"


def test_decode_keeps_spaces_between_latin_words(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    # red bus 和 cat 在 桌 上
    assert decode_caption(tokenizer, [108, 106, 111, 107, 104, 105, 109]) == "red bus和cat在桌上"
    assert decode_caption(tokenizer, []) == ""


def test_decode_merges_wordpiece_continuations(tmp_path: Path) -> None:
    write_vocab(build_vocab(TEXTS, extra_tokens=["##s"]), tmp_path / "vocab.txt")
    tokenizer = load_tokenizer(tmp_path)
    tokens = caption_tokens(tokenizer, "两 cats 猫")
    assert tokens == ["[UNK]", "cat", "##s", "猫"]
    assert decode_caption(tokenizer, tokenizer.convert_tokens_to_ids(tokens)) == "cats猫"


def test_decode_rejects_ids_outside_the_vocab(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    with pytest.raises(ValueError):
        decode_caption(tokenizer, [104, 114])
    with pytest.raises(ValueError):
        decode_caption(tokenizer, [-1])
