"""normalize_text: OpenCC t2s, full-width digits/latin to ASCII, whitespace collapse."""

import pytest

from mengzi_ray.text import normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("繁體", "繁体"),
        ("圖像", "图像"),
        ("一個男人騎馬", "一个男人骑马"),
        ("简体不变", "简体不变"),
    ],
)
def test_traditional_becomes_simplified(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_fullwidth_digits_and_latin_become_ascii() -> None:
    assert normalize_text("ＡＢＣ１２３ａｂｃ") == "ABC123abc"
    assert normalize_text("０９ＡＺａｚ") == "09AZaz"


def test_chinese_and_fullwidth_punctuation_is_kept() -> None:
    text = "你好，世界！对吗？是：的；（好）。"
    assert normalize_text(text) == text


def test_whitespace_runs_collapse_and_ends_are_stripped() -> None:
    assert normalize_text("  两个 \t\n 人\u3000\u3000骑马  ") == "两个 人 骑马"
    assert normalize_text("\u3000") == ""
    assert normalize_text("") == ""


def test_case_is_preserved() -> None:
    assert normalize_text("iPad ＰＲＯ") == "iPad PRO"


def test_idempotent() -> None:
    once = normalize_text(" 圖像　ＡＢ １ ,  測試 ")
    assert once == "图像 AB 1 , 测试"
    assert normalize_text(once) == once


@pytest.mark.parametrize("bad", [None, b"abc", 3])
def test_non_str_raises_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        normalize_text(bad)  # type: ignore[arg-type]
