"""One JSON-lines reader of text rows: image_id is a string at every reader, integer (COCO / AIC-style) or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mengzi_ray.data.records import read_text_rows
from mengzi_ray.serving.gallery import read_caption_rows
from mengzi_ray.training.examples import read_text_table

ROWS = [
    {"image_id": 139, "text": "一只猫", "kind": "caption", "split": "train"},
    {"image_id": "val/7", "text": "两只狗", "kind": "caption", "split": "train"},
    {"image_id": 285, "text": "熊", "kind": "caption", "split": "val"},
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_integer_and_mixed_image_ids_are_strings_at_every_reader(tmp_path: Path) -> None:
    text = _write(tmp_path / "text.jsonl", ROWS)
    table = read_text_table(str(text), "train", "caption")
    assert str(table.schema.field("image_id").type) == "string"
    assert table.column("image_id").to_pylist() == ["139", "val/7"]  # Arrow's JSON reader raised on this mix
    assert [r["image_id"] for r in read_text_rows(text)] == ["139", "val/7", "285"]
    assert read_caption_rows(str(text), "val") == (["熊"], ["285"])


def test_an_unusable_image_id_names_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "image_id": None}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: image_id must be a string or an integer, got None"):
        read_text_rows(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: missing fields \['split'\]"):
        read_text_rows(_write(tmp_path / "bad.jsonl", [{"image_id": 1, "text": "x", "kind": "caption"}]))
