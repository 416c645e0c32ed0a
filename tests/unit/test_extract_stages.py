"""The extract job's parts without Ray: input listing / manifests, the decode stage, the detector stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mengzi_ray.config import ConfigError
from mengzi_ray.features.card import DetectorSection, InputSection
from mengzi_ray.features.extract import DetectorActor, existing_ids, read_and_decode
from mengzi_ray.features.inputs import list_inputs


def write_images(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "a" / "b" / "red.PNG")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "blue.jpg")
    (root / "notes.txt").write_text("not listed")


def test_dir_listing_is_recursive_filtered_and_relative(tmp_path: Path) -> None:
    write_images(tmp_path)
    rows = list_inputs(InputSection(uri=str(tmp_path)))
    assert [r["image_id"] for r in rows] == ["a/b/red", "blue"]
    assert rows[0]["source"] == (tmp_path / "a" / "b" / "red.PNG").as_uri() and rows[0]["boxes_json"] == ""
    with pytest.raises(ConfigError, match="not a directory"):
        list_inputs(InputSection(uri=str(tmp_path / "missing")))


def test_manifest_ids_boxes_labels_and_errors(tmp_path: Path) -> None:
    write_images(tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"uri": "blue.jpg", "image_id": "x1", "boxes": [[0, 0, 4, 4]], "labels": ["狗"]}, ensure_ascii=False)
        + "\n\n" + json.dumps({"uri": str(tmp_path / "a" / "b" / "red.PNG")}) + "\n"
    )
    rows = list_inputs(InputSection(uri=str(manifest)))
    assert rows[0]["image_id"] == "x1" and rows[0]["source"] == (tmp_path / "blue.jpg").as_uri()
    assert json.loads(rows[0]["boxes_json"]) == [[0, 0, 4, 4]] and json.loads(rows[0]["labels_json"]) == ["狗"]
    assert rows[1]["image_id"].endswith("a/b/red")
    for bad, reason in [('{"image_id": "q"}', "non-empty 'uri'"), ("{not json", "line 1: not JSON"),
                        ('{"uri": "a.png", "boxes": [[1, 2]]}', "list of \\[x1, y1, x2, y2\\]"),
                        ('{"uri": "a.png", "labels": ["x"]}', "'labels' needs 'boxes'")]:
        manifest.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=reason):
            list_inputs(InputSection(uri=str(manifest)))
    manifest.write_text('{"uri": "a.png", "image_id": "d"}\n{"uri": "b.png", "image_id": "d"}\n')
    with pytest.raises(ConfigError, match="image_id 'd' occurs twice"):
        list_inputs(InputSection(uri=str(manifest)))


def test_decode_stage_keeps_every_row_and_names_the_stage(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    rows = list_inputs(InputSection(uri=str(tmp_path)))
    rows.append({"source": (tmp_path / "gone.png").as_uri(), "image_id": "gone", "boxes_json": "",
                 "labels_json": ""})
    out = read_and_decode(pa.Table.from_pylist(rows), max_pixels=10_000).to_pylist()
    assert [(r["image_id"], r["stage"]) for r in out] == [("a/b/red", ""), ("blue", ""), ("junk", "decode"),
                                                           ("gone", "read")]
    assert (out[0]["width"], out[0]["height"], len(out[0]["pixels"])) == (20, 10, 20 * 10 * 3)
    assert "FileNotFoundError" in out[3]["error"] and "DecodeError" in out[2]["error"]


def test_detector_stage_isolates_a_failing_image(tmp_path: Path) -> None:
    write_images(tmp_path)
    rows = list_inputs(InputSection(uri=str(tmp_path)))
    rows[0]["boxes_json"], rows[0]["labels_json"] = "[[0, 0, 5, 5]]", '["dog"]'
    rows[1]["boxes_json"] = "[[0, 0, 1]]"  # malformed: this image alone must fail, in stage detect
    decoded = read_and_decode(pa.Table.from_pylist(rows), max_pixels=10_000)
    section = DetectorSection(backend="given_boxes", given_boxes_featurizer="pixel_crops")
    out = DetectorActor(section.model_dump())(decoded).to_pylist()
    assert out[0]["stage"] == "" and out[0]["labels"] == ["dog"] and out[0]["tags"] == ["狗"]
    assert np.asarray(out[0]["features"]).shape == (1, 2054)
    assert out[1]["stage"] == "detect" and "boxes must be finite (N, 4)" in out[1]["error"]
    assert existing_ids(str(tmp_path / "no-dataset-yet")) == set()
