"""Detector contract: card validation, VinVL region selection, the C4 and given-boxes backends, the feature row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from mengzi_ray.synthetic import generate_scene
from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.detectors.base import Detections, Detector, build_detector, detections_to_row
from mengzi_ray.features.detectors.rcnn_ops import nms, select_best_class
from mengzi_ray.features.pixel_regions import PIXEL_DETECTOR_NAME, pixel_region_features
from mengzi_ray.features.schema import REGION_DIM

TINY = dict(allow_random_weights=True, depth=50, groups=1, width_per_group=4, test_min_size=64, test_max_size=100,
            rpn_pre_nms_top_n=50, rpn_post_nms_top_n=6, min_boxes=4, max_boxes=5)


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48, 64, 3), np.uint8), rng.integers(0, 255, (90, 40, 3), np.uint8)]


def test_card_refuses_missing_weights_and_absent_detectron2() -> None:
    with pytest.raises(ValidationError, match="allow_random_weights: true"):
        DetectorSection()
    with pytest.raises(ValidationError, match="detectron2 is not importable.*build it from source"):
        DetectorSection(backend="detectron2", detectron2_config="c.yaml", weights="w.pth")
    with pytest.raises(ValidationError, match="min_boxes=20 exceeds max_boxes=10"):
        DetectorSection(allow_random_weights=True, min_boxes=20, max_boxes=10)
    assert DetectorSection(backend="given_boxes", given_boxes_featurizer="pixel_crops").weights is None


def test_select_best_class_is_per_class_nms_then_best_surviving_class() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]], dtype=torch.float32)
    probs = torch.tensor(
        [[0.1, 0.6, 0.3], [0.1, 0.5, 0.4], [0.2, 0.25, 0.55], [0.9, 0.06, 0.04]], dtype=torch.float32
    )
    per_class = boxes[:, None, :].expand(-1, 3, -1)
    kw = dict(nms_kind="torchvision")
    idx, cls, scores = select_best_class(probs, per_class, score_threshold=0.2, min_detections=0, max_detections=10,
                                         **kw)
    # class 1: box 0 (0.6) suppresses box 1 (0.5); class 2: box 1 (0.4) suppresses box 0 (0.3). Each box keeps its
    # best surviving class; box 3 (0.06) survives both NMS passes but scores below the threshold.
    assert idx.tolist() == [0, 2, 1] and cls.tolist() == [1, 2, 2]
    np.testing.assert_allclose(scores.numpy(), [0.6, 0.55, 0.4])
    idx, _, _ = select_best_class(probs, per_class, score_threshold=0.2, min_detections=0, max_detections=2, **kw)
    assert idx.tolist() == [0, 2]
    idx, cls, _ = select_best_class(probs, per_class, score_threshold=0.99, min_detections=4, max_detections=5, **kw)
    assert idx.tolist() == [0, 2, 1, 3] and cls.tolist() == [1, 2, 2, 1]  # filled up best first


def test_legacy_nms_uses_plus_one_areas_and_suppresses_at_equality() -> None:
    # legacy areas: 100 and 50, overlap 50 → IoU exactly 0.5; torchvision's areas 81 and 36 → IoU 0.444
    boxes = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.5, "legacy").tolist() == [1, 2]  # ascending index order, box 0 suppressed
    assert nms(boxes, scores, 0.5, "torchvision").tolist() == [1, 2, 0]  # score order, nothing suppressed
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2))
    wh = rng.uniform(1, 30, (200, 2))
    many = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)
    many_scores = torch.tensor(rng.uniform(0, 1, 200), dtype=torch.float32)
    assert nms(many, many_scores, 0.3, "legacy").tolist() == legacy_nms_loop(many, many_scores, 0.3)


def legacy_nms_loop(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """The pre-June-2021 compiled CPU op, restated as a plain loop (float32 arithmetic)."""
    b = boxes.numpy()
    areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    order = np.argsort(-scores.numpy(), kind="stable")
    suppressed = np.zeros(len(b), bool)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        for j in order[pos + 1:]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]) + np.float32(1))
            h = max(np.float32(0), min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]) + np.float32(1))
            inter = np.float32(w * h)
            if inter / (areas[i] + areas[j] - inter) >= np.float32(threshold):
                suppressed[j] = True
    return [i for i in range(len(b)) if not suppressed[i]]


def test_torchvision_c4_honours_the_contract(tmp_path: Path) -> None:
    section = DetectorSection(**TINY)
    detector = build_detector(section)
    assert isinstance(detector, Detector) and detector.name.startswith("torchvision_c4:")
    found = detector.detect(images())
    assert len(found) == 2
    for det, img in zip(found, images()):
        assert 4 <= len(det.boxes) <= 5 and det.features.shape == (len(det.boxes), 2048)
        assert det.features.dtype == np.float32 and np.isfinite(det.features).all()
        h, w = img.shape[:2]
        assert (det.boxes[:, [0, 2]] <= w + 1e-3).all() and (det.boxes[:, [1, 3]] <= h + 1e-3).all()
        assert all(isinstance(label, str) for label in det.labels) and det.attributes is None
    again = build_detector(section).detect(images())  # same seed → same random detector (every actor agrees)
    np.testing.assert_array_equal(again[0].features, found[0].features)

    weights = tmp_path / "det.safetensors"
    save_file({k: v.contiguous() for k, v in detector.c4.model.state_dict().items()}, str(weights))
    loaded = build_detector(section.model_copy(update={"weights": str(weights), "allow_random_weights": False}))
    np.testing.assert_array_equal(loaded.detect(images())[1].features, found[1].features)
    assert loaded.name != detector.name  # digest covers the weights file


def test_label_map_and_attribute_head(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(["dog", "cat"]))
    (tmp_path / "attrs.json").write_text(json.dumps(["none", "black", "white"]))
    section = DetectorSection(**TINY, num_classes=3, label_map=str(tmp_path / "labels.json"),
                              attribute_map=str(tmp_path / "attrs.json"), score_threshold=0.0)
    det = build_detector(section).detect(images()[:1])[0]
    assert set(det.labels) <= {"dog", "cat"} and set(det.attributes) <= {"black", "white"}
    with pytest.raises(ValueError, match="2 names, the model has 4"):
        build_detector(section.model_copy(update={"num_classes": 5}))


def test_given_boxes_pixel_crops_reproduce_the_synthetic_features() -> None:
    scene = generate_scene(np.random.default_rng(5))
    image = np.asarray(scene.image)
    detector = build_detector(DetectorSection(backend="given_boxes", given_boxes_featurizer="pixel_crops"))
    assert detector.name == PIXEL_DETECTOR_NAME
    det = detector.detect([image], [scene.boxes])[0]
    np.testing.assert_array_equal(det.features, pixel_region_features(scene.image, scene.boxes))
    np.testing.assert_array_equal(det.boxes, scene.boxes.astype(np.float32))
    with pytest.raises(ValueError, match="image 0 has no boxes"):
        detector.detect([image], [None])


def test_given_boxes_c4_keeps_the_given_boxes() -> None:
    detector = build_detector(DetectorSection(**{**TINY, "backend": "given_boxes"}))
    given = [np.array([[0, 0, 20, 20], [5, 5, 40, 30]], np.float32), np.zeros((0, 4), np.float32)]
    found = detector.detect(images(), given)
    np.testing.assert_array_equal(found[0].boxes, given[0])
    assert found[0].features.shape == (2, 2048) and len(found[1].boxes) == 0


def test_detections_to_row_gives_oscar_vectors_and_chinese_tags() -> None:
    det = Detections(
        boxes=np.array([[10, 20, 50, 80]], np.float32), scores=np.array([0.9], np.float32), labels=["dog"],
        attributes=["black"], features=np.ones((1, 2048), np.float32),
    )
    row = detections_to_row(det, image_id="a/b", source="s3://x/a/b.jpg", width=100, height=200, detector="d")
    vector = np.asarray(row["features"][0], np.float32)
    assert vector.shape == (REGION_DIM,)
    np.testing.assert_allclose(vector[2048:], [0.1, 0.1, 0.5, 0.4, 0.4, 0.3], rtol=1e-6)
    assert row["tags"] == ["狗"] and row["attributes"] == ["black"] and row["labels"] == ["dog"]
    with pytest.raises(ValueError, match="1 boxes but"):
        Detections(boxes=np.zeros((1, 4)), scores=np.zeros(2), labels=["x"], attributes=None,
                   features=np.zeros((1, 2048)))


def test_batches_pad_like_maskrcnn_and_bf16_autocast_runs_the_same_path() -> None:
    section = DetectorSection(**TINY)
    detector = build_detector(section)
    big, small = images()[0], images()[0][:30, :40]
    alone = detector.detect([big])[0]
    batched = detector.detect([big, small])[0]  # the largest image is not padded: same numbers as alone
    np.testing.assert_allclose(batched.features, alone.features, atol=1e-4)
    np.testing.assert_array_equal(batched.boxes, alone.boxes)
    bf16 = build_detector(section.model_copy(update={"autocast": "bf16"})).detect([big])[0]
    assert 4 <= len(bf16.boxes) <= 5 and np.isfinite(bf16.features).all()
    a, b = alone.features.mean(axis=0), bf16.features.mean(axis=0)  # same image, bf16 rounding through 50 layers
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.95


def test_resize_rule_matches_maskrcnn_benchmark() -> None:
    from mengzi_ray.features.detectors.torchvision_c4 import resized_size

    assert resized_size(640, 480, 600, 1000) == (800, 600)
    assert resized_size(480, 640, 600, 1000) == (600, 800)
    assert resized_size(2000, 500, 600, 1000) == (1000, 250)  # long side capped: short side round(1000*500/2000)
    assert resized_size(600, 900, 600, 1000) == (600, 900)  # already the size: untouched
    assert resized_size(333, 500, 600, 1000) == (600, 900)  # int() truncation of 600 * 500 / 333 = 900.9
