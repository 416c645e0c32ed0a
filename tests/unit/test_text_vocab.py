"""build_vocab / write_vocab / read_vocab: bert-base-chinese layout, ordering, file format."""

from pathlib import Path

import pytest

from mengzi_ray.text import build_vocab, read_vocab, write_vocab

# "猫在桌上" + "狗在桌下": 在, 桌 twice; 上 U+4E0A, 下 U+4E0B, 狗 U+72D7, 猫 U+732B once.
TEXTS = ["猫在桌上", "狗在桌下"]
EXPECTED_DATA_TOKENS = ["在", "桌", "上", "下", "狗", "猫"]


def test_special_ids_follow_bert_base_chinese() -> None:
    vocab = build_vocab(TEXTS)
    assert vocab[0] == "[PAD]"
    assert vocab[1] == "[unused1]"
    assert vocab[99] == "[unused99]"
    assert vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_data_tokens_by_descending_count_then_code_point() -> None:
    assert build_vocab(TEXTS)[104:] == EXPECTED_DATA_TOKENS


def test_words_are_normalised_lowercased_and_split_like_bert() -> None:
    # 貓 -> 猫 (t2s), ＣＡＴ -> CAT -> cat, the comma and "!" are their own tokens.
    vocab = build_vocab(["貓，ＣＡＴ Cats!"])
    assert vocab[104:] == ["!", "cat", "cats", "猫", "，"]


def test_min_count_drops_rare_words() -> None:
    assert build_vocab(TEXTS, min_count=2)[104:] == ["在", "桌"]
    with pytest.raises(ValueError):
        build_vocab(TEXTS, min_count=0)


def test_extra_tokens_follow_mask_in_order_without_duplicates() -> None:
    vocab = build_vocab(TEXTS, extra_tokens=["##s", "猫", "[MASK]", "##s"])
    assert vocab[104:] == ["##s", "猫", "在", "桌", "上", "下", "狗"]


@pytest.mark.parametrize("bad", ["", "a b", "x\n"])
def test_extra_tokens_must_be_single_words(bad: str) -> None:
    with pytest.raises(ValueError):
        build_vocab(TEXTS, extra_tokens=[bad])


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    vocab = build_vocab(TEXTS)
    path = write_vocab(vocab, tmp_path / "model" / "vocab.txt")
    assert path.read_text(encoding="utf-8") == "".join(f"{t}\n" for t in vocab)
    assert read_vocab(path) == vocab


def test_write_rejects_duplicates_and_whitespace(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        write_vocab(["[PAD]", "猫", "猫"], tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="whitespace"):
        write_vocab(["[PAD]", "a b"], tmp_path / "vocab.txt")


def test_read_splits_on_newline_only(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_bytes("[PAD]\r\n猫\u2028x\n狗".encode())
    assert read_vocab(path) == ["[PAD]", "猫\u2028x", "狗"]
