"""Exactness against the original: our torchvision_c4 backend vs scene_graph_benchmark's own inference code.

tests/reference/vinvl_detector/ holds what the original (tools/test_sg_net.py's path, run beside the project on
CPU with its compiled ops replaced by a test-side shim; make_reference.py regenerates it) wrote for two tiny
random-weight configs (ResNet-50 C4 with STRIDE_IN_1X1 True; a grouped ResNeXt with STRIDE_IN_1X1 False) on
scikit-image's photographs, with both NMS ops, single images and a padded batch of 2. Here the same checkpoint is
rebuilt from the committed key/shape manifest, converted with import-detector, run through our detector, and every
output of the original's predictions.tsv is compared: boxes, classes, scores, attributes, features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.decode import decode_image
from mengzi_ray.features.detector_import import run_import_detector
from mengzi_ray.features.detectors.base import build_detector

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "vinvl_detector"
CASES = json.loads((REFERENCE / "cases.json").read_text())
FEATURE_ATOL = 1e-4  # fp32
BOX_ATOL = 1e-3  # pixels


def _weights_module():
    spec = importlib.util.spec_from_file_location("vinvl_reference_weights", REFERENCE / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo(name: str) -> np.ndarray:
    """The scikit-image file the reference ran on, decoded as scene_graph_benchmark does (no EXIF, convert RGB)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    data = path.read_bytes()
    recorded = {i["file"]: i["sha256"] for i in CASES["images"]}[name]
    assert hashlib.sha256(data).hexdigest() == recorded, f"{path} is not the file the reference was made from"
    return decode_image(data, exif_orientation=False)


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory) -> dict[str, str]:
    """config name → a detector dir imported from the rebuilt maskrcnn_benchmark checkpoint."""
    weights = _weights_module()
    out = {}
    for name, info in CASES["configs"].items():
        manifest = json.loads((REFERENCE / info["shapes"]).read_text())
        state = weights.make_state_dict(manifest["shapes"], info["weights_seed"], constants=manifest["constants"],
                                        scales=manifest["scales"])
        root = tmp_path_factory.mktemp(f"vinvl_{name}")
        weights.save_checkpoint(state, str(root / "tiny.pth"))
        run_import_detector(format="maskrcnn_benchmark", weights=str(root / "tiny.pth"),
                            labelmap=str(REFERENCE / CASES["labelmap"]), config=str(REFERENCE / info["file"]),
                            out=str(root / "detector"), overrides=list(CASES["seed_opts"]))
        out[name] = str(root / "detector")
    return out


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_detections_equal_the_original(case: dict, detector_dirs: dict[str, str]) -> None:
    reference = np.load(REFERENCE / case["npz"])
    detector = build_detector(DetectorSection(model_dir=detector_dirs[case["config"]], nms=case["nms"]))
    index, worst = 0, {"feature": 0.0, "box": 0.0, "score": 0.0, "attr_score": 0.0}
    for batch in case["batches"]:
        for found in detector.detect([photo(name) for name in batch]):
            p = f"img{index}_"
            assert len(found.boxes) == len(reference[p + "rect"]), f"{case['name']} image {index}: region count"
            assert found.labels == reference[p + "class_names"].tolist()
            worst["box"] = max(worst["box"], float(np.abs(found.boxes - reference[p + "rect"]).max(initial=0)))
            worst["score"] = max(worst["score"], float(np.abs(found.scores - reference[p + "conf"]).max(initial=0)))
            worst["feature"] = max(worst["feature"],
                                   float(np.abs(found.features - reference[p + "feature"]).max(initial=0)))
            names, scores = reference[p + "attr_names"], reference[p + "attr_conf"]
            kept = [[(str(n), float(s)) for n, s in zip(row_n, row_s) if s > 0] for row_n, row_s in zip(names, scores)]
            assert found.attribute_lists == [[n for n, _ in row] for row in kept]
            for ours, theirs in zip(found.attribute_scores, kept):
                diff = np.abs(np.asarray(ours) - np.asarray([s for _, s in theirs])).max(initial=0)
                worst["attr_score"] = max(worst["attr_score"], float(diff))
            index += 1
    print(f"{case['name']}: max |Δ| {worst}")
    assert worst["box"] <= BOX_ATOL and worst["feature"] <= FEATURE_ATOL, worst
    assert worst["score"] <= 1e-5 and worst["attr_score"] <= 1e-5, worst
