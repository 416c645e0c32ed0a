"""TagVocabulary and the shipped, corrected Visual Genome → Chinese tag data."""

import json
from importlib import resources
from pathlib import Path

import pytest

from mengzi_ray.text import TagTranslation, TagVocabulary, normalize_text, tag_string


def _package_json(name: str) -> object:
    text = resources.files("mengzi_ray.text").joinpath("data").joinpath(name).read_text("utf-8")
    return json.loads(text)


def test_default_has_every_visual_genome_class() -> None:
    vocab = TagVocabulary.default()
    assert len(vocab) == 1594
    assert TagVocabulary.default() is vocab


@pytest.mark.parametrize(
    ("label", "tag"),
    [
        ("ad", "广告"),
        ("air conditioner", "空调"),
        ("back", "背部"),
        ("background", "背景"),
        ("baby", "婴儿"),
        ("bag", "包"),
        ("orange", "橙子"),
        ("pepperoni", "意大利辣香肠"),
        ("giraffe", "长颈鹿"),
    ],
)
def test_known_translations(label: str, tag: str) -> None:
    assert TagVocabulary.default().translate([label]).tags == [tag]


def test_lookup_ignores_case_and_surrounding_whitespace() -> None:
    vocab = TagVocabulary.default()
    result = vocab.translate(["AD", "  Air   Conditioner\t"])
    assert result == TagTranslation(tags=["广告", "空调"], unknown=[])
    assert "Air Conditioner " in vocab
    assert "spaceship" not in vocab
    assert "" not in vocab
    assert 3 not in vocab


def test_unknown_labels_are_kept_and_reported_once() -> None:
    result = TagVocabulary.default().translate(["dog", " spaceship ", "cat", "spaceship"])
    assert result.tags == ["狗", "spaceship", "猫", "spaceship"]
    assert result.unknown == ["spaceship"]


def test_translate_rejects_empty_and_non_str_labels() -> None:
    vocab = TagVocabulary.default()
    with pytest.raises(ValueError):
        vocab.translate(["dog", "  "])
    with pytest.raises(TypeError):
        vocab.translate([None])  # type: ignore[list-item]


def test_every_shipped_value_is_a_nonempty_normalised_word() -> None:
    data = _package_json("tag_vocab_zh.json")
    assert isinstance(data, dict) and len(data) == 1594
    assert list(data) == sorted(data)
    for label, tag in data.items():
        assert label == " ".join(label.split()).lower()
        assert tag and normalize_text(tag) == tag
        assert not any(char.isspace() for char in tag), label
    assert TagVocabulary.default().as_dict() == data


def test_every_correction_is_applied_and_changes_the_original() -> None:
    vocab = _package_json("tag_vocab_zh.json")
    corrections = _package_json("tag_corrections.json")
    assert isinstance(vocab, dict) and isinstance(corrections, list)
    labels = [entry["label"] for entry in corrections]
    assert len(labels) == len(set(labels)) > 0
    for entry in corrections:
        assert set(entry) == {"label", "original", "corrected", "why"}
        assert vocab[entry["label"]] == entry["corrected"]
        assert entry["corrected"] != entry["original"]
        assert entry["why"].strip()
    assert {"label": "ad", "original": "公元", "corrected": "广告"}.items() <= next(
        entry for entry in corrections if entry["label"] == "ad"
    ).items()


def test_from_json_normalises_values(tmp_path: Path) -> None:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"Dog": " 狗 ", "picture": "圖像"}, ensure_ascii=False), "utf-8")
    vocab = TagVocabulary.from_json(path)
    assert len(vocab) == 2
    assert vocab.translate(["dog", "PICTURE"]).tags == ["狗", "图像"]


def test_from_json_rejects_bad_tables(tmp_path: Path) -> None:
    path = tmp_path / "tags.json"
    path.write_text("[]", "utf-8")
    with pytest.raises(ValueError, match="object"):
        TagVocabulary.from_json(path)
    with pytest.raises(ValueError):
        TagVocabulary({"dog": "狗", "DOG": "犬"})
    with pytest.raises(ValueError):
        TagVocabulary({"dog": "  "})


def test_tag_string_joins_with_single_spaces() -> None:
    assert tag_string(["人", "狗", "草地"]) == "人 狗 草地"
    assert tag_string([]) == ""
    with pytest.raises(ValueError):
        tag_string(["人", ""])
