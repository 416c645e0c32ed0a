"""Oscar/VinVL TSV interop: lossless round trips both ways, .lineidx offsets, the caption layout, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mengzi_ray.config import ConfigError, JobFailed
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.features.card import ExportOscarCard
from mengzi_ray.features.oscar_import import run_import
from mengzi_ray.features.oscar_import.cards import CaptionTsvImport, VinvlTsvImport
from mengzi_ray.features.oscar_tsv import decode_regions, encode_regions, run_export


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return write_synthetic_dataset(tmp_path / "syn", num_train=6, num_val=2).root


def export_import(dataset: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    tsv, back = tmp_path / f"{name}_tsv", tmp_path / f"{name}_back"
    run_export(ExportOscarCard(dataset=str(dataset), output=str(tsv)))
    run_import(VinvlTsvImport(format="vinvl", features=str(tsv / "features.tsv"),
                               labels=str(tsv / "predictions.tsv"), output=str(back)))
    return tsv, back


def test_dataset_tsv_dataset_is_lossless_and_tsv_is_stable(synthetic: Path, tmp_path: Path) -> None:
    tsv, back = export_import(synthetic, tmp_path, "first")
    original, restored = pq.read_table(synthetic / "features"), pq.read_table(back / "features")
    assert restored.equals(original)  # every column, bit for bit (the 2054-d vectors included)
    tsv2, _ = export_import(back, tmp_path, "second")
    for name in ("features.tsv", "predictions.tsv", "features.lineidx", "imageid2idx.json"):
        assert (tsv2 / name).read_bytes() == (tsv / name).read_bytes(), name


def test_tsv_layout_is_what_oscar_reads(synthetic: Path, tmp_path: Path) -> None:
    tsv, _ = export_import(synthetic, tmp_path, "layout")
    raw = (tsv / "features.tsv").read_bytes()
    offsets = [int(x) for x in (tsv / "features.lineidx").read_text().split()]
    index = json.loads((tsv / "imageid2idx.json").read_text())
    table = pq.read_table(synthetic / "features").to_pylist()
    assert len(offsets) == len(index) == len(table)
    for row in table:
        start = offsets[index[row["image_id"]]]
        key, num_boxes, b64 = raw[start : raw.index(b"\n", start)].decode().split("\t")
        assert key == row["image_id"] and int(num_boxes) == len(row["boxes"])
        np.testing.assert_array_equal(decode_regions(b64, int(num_boxes)), np.asarray(row["features"], np.float32))
    first = json.loads((tsv / "predictions.tsv").read_text().splitlines()[0].split("\t")[1])
    assert {"image_h", "image_w", "objects"} <= set(first)
    assert {"rect", "class", "conf", "bbox_id"} <= set(first["objects"][0])


def test_vinvl_2048_features_and_caption_layout_import(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    appearance = rng.random((2, 2048), dtype=np.float32)
    objects = [{"rect": [0, 0, 40, 30], "class": "dog", "conf": 0.9}, {"rect": [10, 5, 80, 60], "class": "cat",
                                                                       "conf": 0.5}]
    (tmp_path / "predictions.tsv").write_text("img1\t" + json.dumps({"image_h": 60, "image_w": 80,
                                                                       "objects": objects}) + "\n")
    (tmp_path / "features.tsv").write_text(f"img1\t2\t{encode_regions(appearance)}\n")
    run_import(VinvlTsvImport(format="vinvl", features=str(tmp_path / "features.tsv"),
                               labels=str(tmp_path / "predictions.tsv"), output=str(tmp_path / "a")))
    row = pq.read_table(tmp_path / "a" / "features").to_pylist()[0]
    vectors = np.asarray(row["features"], np.float32)
    np.testing.assert_array_equal(vectors[:, :2048], appearance)
    np.testing.assert_allclose(vectors[1, 2048:], [10 / 80, 5 / 60, 1.0, 1.0, 70 / 80, 55 / 60], rtol=1e-6)
    assert row["tags"] == ["狗", "猫"] and (row["width"], row["height"]) == (80, 60)

    full = np.concatenate([appearance, vectors[:, 2048:]], axis=1)
    (tmp_path / "label.tsv").write_text("img1\t" + json.dumps(objects) + "\n")  # bare list: size from geometry
    (tmp_path / "feature.tsv").write_text("img1\t" + json.dumps({"num_boxes": 2,
                                                                  "features": encode_regions(full)}) + "\n")
    run_import(CaptionTsvImport(format="caption", features=str(tmp_path / "feature.tsv"),
                               labels=str(tmp_path / "label.tsv"), output=str(tmp_path / "b")))
    row = pq.read_table(tmp_path / "b" / "features").to_pylist()[0]
    np.testing.assert_array_equal(np.asarray(row["features"], np.float32), full)
    assert (row["width"], row["height"]) == (80, 60) and row["boxes"][1] == [10, 5, 80, 60]
    (tmp_path / "label.tsv").write_text("img1\t" + json.dumps([{"class": "dog"}, {"class": "cat"}]) + "\n")
    run_import(CaptionTsvImport(format="caption", features=str(tmp_path / "feature.tsv"),
                                labels=str(tmp_path / "label.tsv"), output=str(tmp_path / "c")))
    row = pq.read_table(tmp_path / "c" / "features").to_pylist()[0]  # no rects, no size: Oscar's 600x800
    assert (row["width"], row["height"]) == (800, 600)
    np.testing.assert_allclose(row["boxes"][1], [100, 50, 800, 600], rtol=1e-5)  # x1/W·800


def test_bad_rows_name_the_file_and_image(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text('img1\t{"objects": [{"rect": [0,0,1,1], "class": "dog"}]}\n')
    (tmp_path / "f.tsv").write_text(f"img1\t2\t{encode_regions(np.zeros((2, 2054)))}\n")
    card = VinvlTsvImport(format="vinvl", features=str(tmp_path / "f.tsv"), labels=str(tmp_path / "p.tsv"),
                          output=str(tmp_path / "o"))
    with pytest.raises(JobFailed, match=r"f.tsv line 1 \(labels .*p.tsv line 1\): 2 feature rows but 1 label"):
        run_import(card)
    (tmp_path / "f.tsv").write_text(f"img2\t1\t{encode_regions(np.zeros((1, 2054)))}\n")
    with pytest.raises(JobFailed, match="image 'img2' has no row in"):
        run_import(card)
    (tmp_path / "f.tsv").write_text("img1\tnotanumber\n")
    with pytest.raises(JobFailed, match="f.tsv line 1: expected 3 columns"):
        run_import(card)
    with pytest.raises(ConfigError, match="missing.tsv: file not found"):
        run_import(card.model_copy(update={"features": str(tmp_path / "missing.tsv")}))
    with pytest.raises(ConfigError, match="no features/ directory"):
        run_export(ExportOscarCard(dataset=str(tmp_path / "nothing"), output=str(tmp_path / "x")))


def test_attribute_lists_survive_the_predictions_json() -> None:
    from mengzi_ray.features.oscar_import.regions import region_record
    from mengzi_ray.features.oscar_tsv import prediction_json
    from mengzi_ray.features.schema import feature_row
    from mengzi_ray.text.tags import TagVocabulary

    row = feature_row(image_id="a", source="s", width=100, height=80, boxes=np.array([[1, 2, 30, 40], [5, 5, 9, 9]]),
                      appearance=np.ones((2, 2048), np.float32), scores=[0.9, 0.5], labels=["dog", "cat"],
                      tags=["狗", "猫"], detector="d", attributes=["black", ""],
                      attribute_lists=[["black", "small"], []], attribute_scores=[[0.5, 0.25], []])
    back = region_record("a", np.asarray(row["features"], np.float32), prediction_json(row), source="f.tsv#a",
                         detector="x", tags=TagVocabulary.default(), where="f.tsv line 1")
    assert back.attribute_lists == [["black", "small"], []] and back.attribute_scores == [[0.5, 0.25], []]
    assert back.attributes == ["black", ""]
