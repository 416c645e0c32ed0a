"""Extraction ships images at the torchvision_c4 detector's input size (decode.shipping_size), not at full
resolution, and the features and boxes (in original pixels) are bit-identical to detecting the full-size image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mengzi_ray.features.card import DetectorSection, InputSection
from mengzi_ray.features.decode import resize_for_detector, resized_size, shipping_size
from mengzi_ray.features.extract import DetectorActor, _detector_sizes, read_and_decode
from mengzi_ray.features.inputs import list_inputs
from tests.unit.test_detector import TINY

SIZES = (TINY["test_min_size"], TINY["test_max_size"])  # 64, 100


def _images(root: Path) -> list[dict]:
    rng = np.random.default_rng(3)
    for name, (h, w) in {"wide": (150, 400), "tall": (333, 222), "small": (40, 30), "exact": (64, 96)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / f"{name}.png")
    return list_inputs(InputSection(uri=str(root)))


def test_shipped_pixels_are_the_detectors_input_and_much_smaller(tmp_path: Path) -> None:
    rows = pa.Table.from_pylist(_images(tmp_path))
    full = {r["image_id"]: r for r in read_and_decode(rows, 10**7).to_pylist()}
    small = {r["image_id"]: r for r in read_and_decode(rows, 10**7, detector_sizes=SIZES).to_pylist()}
    for image_id, row in small.items():
        original = np.frombuffer(full[image_id]["pixels"], np.uint8).reshape(row["height"], row["width"], 3)
        assert (row["width"], row["height"]) == (full[image_id]["width"], full[image_id]["height"])
        assert (row["pixel_width"], row["pixel_height"]) == shipping_size(row["width"], row["height"], *SIZES)
        shipped = np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)
        np.testing.assert_array_equal(resize_for_detector(shipped, *SIZES), resize_for_detector(original, *SIZES))
    assert len(small["wide"]["pixels"]) * 10 < len(full["wide"]["pixels"])
    assert (small["small"]["pixel_width"], small["small"]["pixel_height"]) == (64, 85)  # upscaled as the detector does


def test_detections_from_shipped_images_equal_full_size_ones(tmp_path: Path) -> None:
    rows = pa.Table.from_pylist(_images(tmp_path))
    section = DetectorSection(**TINY)
    assert _detector_sizes(section) == SIZES
    actor = DetectorActor(section.model_dump())
    full = actor(read_and_decode(rows, 10**7)).to_pylist()
    small = actor(read_and_decode(rows, 10**7, detector_sizes=SIZES)).to_pylist()
    assert [r["stage"] for r in small] == [""] * 4
    for a, b in zip(full, small):
        assert a["image_id"] == b["image_id"] and (a["width"], a["height"]) == (b["width"], b["height"])
        for column in ("boxes", "features", "scores", "labels", "tags"):
            assert a[column] == b[column], (a["image_id"], column)
    wide = next(r for r in small if r["image_id"] == "wide")
    assert np.asarray(wide["boxes"]).max() > max(SIZES)  # original pixels (400 wide), not detector pixels (≤ 100)


def test_only_the_torchvision_c4_resize_rule_is_applied_early() -> None:
    assert _detector_sizes(DetectorSection(backend="given_boxes", given_boxes_featurizer="pixel_crops")) is None


@pytest.mark.parametrize("width,height", [(400, 150), (222, 333), (30, 40), (96, 64), (1000, 999), (5, 900)])
def test_shipping_size_is_exact_or_the_original(width: int, height: int) -> None:
    ship = shipping_size(width, height, *SIZES)
    target = resized_size(width, height, *SIZES)
    assert ship == target if resized_size(*target, *SIZES) == target else ship == (width, height)
