"""import-detector: scene_graph_benchmark files → a detector dir; refusals that write nothing; model_dir in a card."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mengzi_ray.cli import main
from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.detector_import import DetectorImportError, run_import_detector
from mengzi_ray.features.detectors.base import build_detector
from mengzi_ray.features.detectors.detector_dir import resolve_detector
from mengzi_ray.features.detectors.torchvision_c4 import build_network
from test_storage_s3 import s3_endpoint  # noqa: F401  (fixture)
from vinvl_checkpoint import ATTRIBUTES, CLASSES, SEED_OVERRIDES, write_tiny_vinvl_files

TINY_SHAPE = dict(depth=50, groups=2, width_per_group=4, stride_in_1x1=False, num_classes=7, allow_random_weights=True)


def _network() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_network(DetectorSection(**TINY_SHAPE), num_attributes=len(ATTRIBUTES) + 1)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return write_tiny_vinvl_files(tmp_path / "released", _network())


def _import(files: dict[str, Path], out: Path, overrides=SEED_OVERRIDES, **changes) -> dict:
    args = dict(format="maskrcnn_benchmark", weights=str(files["weights"]), labelmap=str(files["labelmap"]),
                config=str(files["config"]), out=str(out), overrides=list(overrides))
    return run_import_detector(**{**args, **changes})


def test_import_writes_weights_names_and_every_setting(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "det"
    assert main(["import-detector", "--weights", str(files["weights"]), "--labelmap", str(files["labelmap"]),
                 "--config", str(files["config"]), "--out", str(out), *SEED_OVERRIDES,
                 "MODEL.RPN.POST_NMS_TOP_N_TEST", "25"]) == 0
    labelmap = json.loads((out / "labelmap.json").read_text())
    assert labelmap == {"classes": CLASSES, "attributes": ["__no_attribute__", *ATTRIBUTES]}
    settings = yaml.safe_load((out / "detector.yaml").read_text())
    assert settings["nms_filter"] == "best_class" and settings["ignore_box_regression"] is True
    assert settings["rpn_post_nms_top_n"] == 25 and settings["rpn_pre_nms_top_n"] == 200  # override, then yaml
    assert settings["input_format"] == "bgr255" and settings["pixel_mean"] == [103.53, 116.28, 123.675]
    assert settings["pixel_std"] == [1.0, 1.0, 1.0] and settings["exif_orientation"] is False  # defaults.py
    assert settings["stride_in_1x1"] is False and (settings["groups"], settings["width_per_group"]) == (2, 4)
    assert settings["attr_score_threshold"] == 0.05 and settings["min_boxes"] == 3 and settings["max_boxes"] == 12
    assert settings["rpn_nms_iou"] == 0.7 and settings["nms_iou"] == 0.5 and settings["test_min_size"] == 96
    weights = load_file(str(out / "model.safetensors"))
    reference = _network().state_dict()
    assert set(weights) == set(reference)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)

    section = DetectorSection(model_dir=str(out), score_threshold=0.5)  # an explicit card field wins over the dir
    resolved = resolve_detector(section)
    assert resolved.score_threshold == 0.5 and resolved.rpn_post_nms_top_n == 25 and resolved.model_dir is None
    image = np.random.default_rng(0).integers(0, 255, (120, 90, 3), np.uint8)
    found = build_detector(section).detect([image])[0]
    assert 3 <= len(found.boxes) <= 12 and found.features.shape == (len(found.boxes), 2048)
    assert set(found.labels) <= set(CLASSES) and found.attribute_lists is not None
    assert all(set(names) <= set(ATTRIBUTES) for names in found.attribute_lists)


def _expect_refusal(files: dict[str, Path], out: Path, match: str, **changes) -> None:
    with pytest.raises(DetectorImportError, match=match):
        _import(files, out, **changes)
    assert not out.exists()


def test_malformed_inputs_are_refused_and_nothing_is_written(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "never"
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    _expect_refusal(files, out, "not a torch checkpoint", weights=str(text))

    full = torch.load(files["weights"], weights_only=True)["model"]
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in full.items() if "cls_score" not in k} | {"module.extra.w": torch.ones(1)}},
               partial)
    _expect_refusal(files, out, r"2 weights the model needs are missing: \['cls_score.bias', 'cls_score.weight'\]"
                    r".*1 weights nothing uses: \['module.extra.w'\]", weights=str(partial))

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": full, "note": Payload()}))
    _expect_refusal(files, out, "refused", weights=str(evil))
    stringly = tmp_path / "strings.pth"
    torch.save({"model": {**full, "module.rpn.head.conv.weight": "not a tensor"}}, stringly)
    _expect_refusal(files, out, r"not tensors: \['module.rpn.head.conv.weight'\]", weights=str(stringly))

    bad_labels = tmp_path / "labels.json"
    bad_labels.write_text(json.dumps({"label_to_idx": {"dog": 1}}))
    _expect_refusal(files, out, "label_to_idx must map 6 names", labelmap=str(bad_labels))
    _expect_refusal(files, out, "MODEL.RPN.USE_FPN = True", overrides=[*SEED_OVERRIDES, "MODEL.RPN.USE_FPN", "True"])
    _expect_refusal(files, out, "odd number", overrides=["MODEL.ROI_HEADS.NMS_FILTER"])
    _expect_refusal(files, out, "detectron2", format="detectron2")
    assert main(["import-detector", "--weights", str(text), "--labelmap", str(files["labelmap"]),
                 "--config", str(files["config"]), "--out", str(out)]) == 2


def test_a_card_without_weights_or_model_dir_is_refused() -> None:
    with pytest.raises(ValueError, match="neither model_dir nor weights"):
        DetectorSection()
    with pytest.raises(ValueError, match="either model_dir .* or weights"):
        DetectorSection(model_dir="d", weights="w.safetensors")


def test_a_detector_dir_on_s3(files: dict[str, Path], s3_endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mengzi-models")
    _import(files, "s3://mengzi-models/detectors/tiny")
    section = resolve_detector(DetectorSection(model_dir="s3://mengzi-models/detectors/tiny"))
    assert section.weights == "s3://mengzi-models/detectors/tiny/model.safetensors" and section.exif_orientation is False
    image = np.random.default_rng(1).integers(0, 255, (100, 140, 3), np.uint8)
    local = build_detector(DetectorSection(model_dir=str(_import_local(files))))
    np.testing.assert_array_equal(build_detector(section).detect([image])[0].features,
                                  local.detect([image])[0].features)


def _import_local(files: dict[str, Path]) -> Path:
    out = files["weights"].parent / "local_dir"
    _import(files, out)
    return out
