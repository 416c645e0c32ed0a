"""The synthetic caption set and the pixel featurizer: determinism, truthful captions and boxes, readable files,
and appearance vectors that carry colour and shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mengzi_ray.synthetic import (
    CAPTIONS_PER_IMAGE,
    COLOURS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SyntheticDataset,
    generate_scene,
    write_synthetic_dataset,
)
from mengzi_ray.features.pixel_regions import PIXEL_DETECTOR_NAME, USED_DIM, pixel_region_features
from mengzi_ray.features.schema import FEATURES_SCHEMA, box_geometry, region_matrix

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_RELATION = re.compile(rf"^({_COLOUR})的({_SHAPE})在({_COLOUR})的({_SHAPE})(左边|右边|上面|下面)$")


def _scenes(seed: int, count: int) -> list[Scene]:
    return [generate_scene(np.random.default_rng([seed, i])) for i in range(count)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=12, num_val=5, seed=3)


def test_generate_scene_is_deterministic() -> None:
    a, b = generate_scene(np.random.default_rng(7)), generate_scene(np.random.default_rng(7))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.objects == b.objects and a.captions == b.captions
    others = _scenes(8, 5)
    assert any(s.captions != a.captions for s in others)


def test_captions_describe_the_drawn_objects() -> None:
    for scene in _scenes(1, 60):
        assert 1 <= len(scene.objects) <= 3
        assert len(set(scene.captions)) == CAPTIONS_PER_IMAGE
        assert all(len(c) <= 20 for c in scene.captions), scene.captions
        text = "".join(scene.captions)
        for obj in scene.objects:
            assert obj.phrase in text or f"{obj.colour}{obj.shape}" in text
        drawn = {(o.colour, o.shape): o for o in scene.objects}
        mentioned_colours = set(re.findall(_COLOUR, text))
        assert mentioned_colours == {o.colour for o in scene.objects}
        for caption in scene.captions:
            match = _RELATION.match(caption)
            if match is None:
                continue
            c1, s1, c2, s2, relation = match.groups()
            (x1, y1), (x2, y2) = drawn[(c1, s1)].centre, drawn[(c2, s2)].centre
            holds = {"左边": x1 < x2, "右边": x1 > x2, "上面": y1 < y2, "下面": y1 > y2}[relation]
            assert holds, (caption, scene.objects)


def test_boxes_are_tight_around_the_drawn_pixels() -> None:
    for scene in _scenes(2, 40):
        pixels = np.asarray(scene.image).astype(int)
        size = pixels.shape[0]
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert np.abs(pixels[cy, cx] - COLOURS[obj.colour]).max() <= 15
            # Within a 2-pixel margin, pixels of the object's colour span exactly its box.
            ox1, oy1 = max(0, x1 - 2), max(0, y1 - 2)
            near = np.abs(pixels[oy1 : y2 + 2, ox1 : x2 + 2] - COLOURS[obj.colour]).max(axis=-1) <= 15
            ys, xs = np.nonzero(near)
            assert (xs.min() + ox1, ys.min() + oy1, xs.max() + ox1 + 1, ys.max() + oy1 + 1) == (x1, y1, x2, y2)


def test_pixel_features_recover_colour_and_shape() -> None:
    rng = np.random.default_rng(11)
    # One reference per (colour, shape), each alone on its own canvas: a one-shot nearest-neighbour test.
    references, reference_keys = [], []
    while len(reference_keys) < len(COLOURS) * len(SHAPES):
        scene = generate_scene(rng)
        for obj, vector in zip(scene.objects, pixel_region_features(scene.image, scene.boxes)):
            if (obj.colour, obj.shape) not in reference_keys:
                references.append(vector)
                reference_keys.append((obj.colour, obj.shape))
    references = np.stack(references)
    held_out = [(o, v) for s in _scenes(12, 60) for o, v in zip(s.objects, pixel_region_features(s.image, s.boxes))]
    correct = 0
    for obj, vector in held_out:
        nearest = int(np.argmin(np.linalg.norm(references - vector, axis=1)))
        correct += reference_keys[nearest] == (obj.colour, obj.shape)
    assert len(held_out) >= 100
    assert correct / len(held_out) >= 0.95


def test_pixel_features_contract() -> None:
    scene = generate_scene(np.random.default_rng(5))
    image = scene.image
    size = image.width
    boxes = np.array([[10, 10, 10, 30], [40, 40, 20, 60], [-50, -50, -10, -10], [0, 0, size, size], [-5, -5, 500, 500]])
    out = pixel_region_features(image, boxes)
    assert out.shape == (5, 2048) and out.dtype == np.float32
    assert not out[:3].any()  # zero-width, reversed and fully-outside boxes
    assert np.array_equal(out[3], out[4])  # clipping to the image
    assert np.array_equal(out[3], pixel_region_features(np.asarray(image), boxes[3:4])[0])
    assert pixel_region_features(image, np.zeros((0, 4))).shape == (0, 2048)
    assert np.isfinite(out).all() and not out[:, USED_DIM:].any()  # documented zero padding
    assert PIXEL_DETECTOR_NAME == "pixel_crops_v1"


def test_dataset_files(dataset: SyntheticDataset) -> None:
    table = pq.read_table(dataset.features_path)
    assert table.schema.equals(FEATURES_SCHEMA)
    frame = pd.read_parquet(dataset.features_path)
    assert len(frame) == len(table) == dataset.num_train + dataset.num_val
    manifest = {r["image_id"]: r for r in map(json.loads, dataset.boxes_path.read_text(encoding="utf-8").splitlines())}
    for row in table.to_pylist():
        boxes = np.asarray(row["boxes"], dtype=np.float32)
        regions = region_matrix(row["features"])
        assert regions.shape == (len(boxes), 2054) and len(boxes) >= 1
        assert np.allclose(regions[:, 2048:], box_geometry(boxes, row["width"], row["height"]))
        assert row["scores"] == [1.0] * len(boxes)
        assert set(row["labels"]) <= set(SHAPES.values()) and row["tags"] == [
            {v: k for k, v in SHAPES.items()}[label] for label in row["labels"]
        ]
        assert row["detector"] == PIXEL_DETECTOR_NAME
        path = Path(row["source"].removeprefix("file://"))
        assert path == dataset.images_dir / f"{row['image_id']}.png"
        with Image.open(path) as image:
            assert image.size == (row["width"], row["height"])
        assert manifest[row["image_id"]]["uri"] == row["source"]
        assert np.allclose(manifest[row["image_id"]]["boxes"], boxes)
        assert manifest[row["image_id"]]["labels"] == row["labels"]
    assert (frame["image_id"] == table.column("image_id").to_pylist()).all()


def test_splits_have_requested_sizes_and_no_overlap(dataset: SyntheticDataset) -> None:
    texts = [json.loads(line) for line in dataset.text_path.read_text(encoding="utf-8").splitlines()]
    assert {t["kind"] for t in texts} == {"caption"} and len(texts) == dataset.num_captions
    ids = {split: {t["image_id"] for t in texts if t["split"] == split} for split in SPLITS}
    assert len(ids["train"]) == dataset.num_train and len(ids["val"]) == dataset.num_val
    assert not ids["train"] & ids["val"]
    assert all(image_id.startswith(f"{split}/") for split in SPLITS for image_id in ids[split])
    for split in SPLITS:
        assert sorted(p.stem for p in (dataset.images_dir / split).glob("*.png")) == sorted(
            i.split("/")[1] for i in ids[split]
        )


def test_write_is_deterministic(tmp_path: Path, dataset: SyntheticDataset) -> None:
    again = write_synthetic_dataset(tmp_path / "again", num_train=12, num_val=5, seed=3)
    assert again.text_path.read_bytes() == dataset.text_path.read_bytes()
    a, b = pq.read_table(dataset.features_path), pq.read_table(again.features_path)
    assert a.drop(["source"]).equals(b.drop(["source"]))
    assert (again.images_dir / "val/000004.png").read_bytes() == (dataset.images_dir / "val/000004.png").read_bytes()
    other = write_synthetic_dataset(tmp_path / "other", num_train=12, num_val=5, seed=4)
    assert other.text_path.read_bytes() != dataset.text_path.read_bytes()
    # A smaller rewrite of the same directory leaves no stale images behind.
    smaller = write_synthetic_dataset(tmp_path / "again", num_train=4, num_val=2, seed=3)
    assert len(list((smaller.images_dir / "train").glob("*.png"))) == 4
    assert pq.read_table(smaller.features_path).column("image_id").to_pylist()[:4] == [
        f"train/{i:06d}" for i in range(4)
    ]


def test_image_records_join_features_and_texts(dataset: SyntheticDataset, tmp_path: Path) -> None:
    from mengzi_ray.data.records import load_image_records
    from mengzi_ray.text import tag_string

    table = pq.read_table(dataset.features_path).to_pylist()
    by_id = {row["image_id"]: row for row in table}
    records = load_image_records(dataset.features_path, dataset.text_path, "val")
    assert len(records) == 5 and all(len(r.texts) == CAPTIONS_PER_IMAGE for r in records)
    for record in records:
        row = by_id[record.image_id]
        np.testing.assert_array_equal(record.features, region_matrix(row["features"]))
        assert record.od_labels == tag_string(row["tags"])

    orphan = tmp_path / "text.jsonl"
    orphan.write_text(json.dumps({"image_id": "nowhere", "text": "红色的圆形", "kind": "caption", "split": "val"}) + "\n")
    with pytest.raises(ValueError, match="no features"):
        load_image_records(dataset.features_path, orphan, "val")


def test_text_rows_name_the_file_and_line_of_a_bad_row(tmp_path: Path) -> None:
    from mengzi_ray.data.records import read_text_rows

    good = {"image_id": "a", "text": "红色的圆形", "kind": "caption", "split": "val"}
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"text\.jsonl line 3: not JSON"):
        read_text_rows(path)
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_text_rows(path) == [good]


def test_unique_mode_captions_name_exactly_one_image(tmp_path: Path) -> None:
    ds = write_synthetic_dataset(tmp_path / "unique", num_train=0, num_val=400, seed=2, unique=True)
    rows = [json.loads(line) for line in ds.text_path.read_text(encoding="utf-8").splitlines()]
    images_of: dict[str, set[str]] = {}
    for row in rows:
        images_of.setdefault(row["text"], set()).add(row["image_id"])
    assert len(rows) == 400 * CAPTIONS_PER_IMAGE
    assert all(len(ids) == 1 for ids in images_of.values())  # every sentence describes exactly one image
    smaller = write_synthetic_dataset(tmp_path / "prefix", num_train=0, num_val=150, seed=2, unique=True)
    assert smaller.text_path.read_text(encoding="utf-8").splitlines() == ds.text_path.read_text(encoding="utf-8").splitlines()[:450]


def test_unique_scenes_name_every_object_with_its_visible_size() -> None:
    for i in range(80):
        scene = generate_scene(np.random.default_rng([4, i]), 96, unique=True)
        for caption in scene.captions:  # each caption alone names every object fully
            assert all(o.full_phrase in caption for o in scene.objects), (caption, scene.objects)
        sides = {o.size: o.box[2] - o.box[0] for o in scene.objects}
        for obj in scene.objects:
            assert obj.size in SIZES
            if len(sides) == 2:  # both classes in one scene: every 大 is bigger than every 小
                assert max(o.box[2] - o.box[0] for o in scene.objects if o.size == "小") < min(
                    o.box[2] - o.box[0] for o in scene.objects if o.size == "大")
    with pytest.raises(ValueError, match="at least 64 pixels"):
        generate_scene(np.random.default_rng(0), 48, unique=True)
