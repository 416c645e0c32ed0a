"""Tiny detector files in scene_graph_benchmark's layout, written by tests: an sgg-style yaml config, a
VG-SGG-dicts labelmap and a `.pth` checkpoint keyed the way maskrcnn_benchmark saves AttrRCNN
(`{"model": {"module.backbone.body...": tensor}, "optimizer": ..., "iteration": N}`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLASSES = ["person", "dog", "cat", "tree", "car", "sky"]
ATTRIBUTES = ["red", "white", "black", "small", "wooden"]

TINY_SGG_YAML = """\
MODEL:
  META_ARCHITECTURE: "AttrRCNN"
  BACKBONE:
    CONV_BODY: "R-50-C4"
  RESNETS:
    BACKBONE_OUT_CHANNELS: 1024
    STRIDE_IN_1X1: False
    NUM_GROUPS: 2
    WIDTH_PER_GROUP: 4
  RPN:
    PRE_NMS_TOP_N_TEST: 200
    POST_NMS_TOP_N_TEST: 30
  ROI_HEADS:
    SCORE_THRESH: 0.2
    DETECTIONS_PER_IMG: 12
    MIN_DETECTIONS_PER_IMG: 3
  ROI_BOX_HEAD:
    NUM_CLASSES: 7
  ROI_ATTRIBUTE_HEAD:
    NUM_ATTRIBUTES: 6
    POSTPROCESS_ATTRIBUTES_THRESHOLD: 0.05
  ATTRIBUTE_ON: True
INPUT:
  MIN_SIZE_TEST: 96
  MAX_SIZE_TEST: 160
  PIXEL_MEAN: [103.530, 116.280, 123.675]
SOLVER:
  BASE_LR: 0.01
TEST:
  IMS_PER_BATCH: 1
  TSV_SAVE_SUBSET: ['rect', 'class', 'conf', 'feature']
"""
# the seed's extraction overrides (Mengzi-Oscar's test_sg_net.py command line)
SEED_OVERRIDES = ["MODEL.ROI_HEADS.NMS_FILTER", "1", "MODEL.ROI_HEADS.SCORE_THRESH", "0.2",
                  "TEST.IGNORE_BOX_REGRESSION", "True", "MODEL.ATTRIBUTE_ON", "True", "TEST.OUTPUT_FEATURE", "True"]

# ours → the original's prefix, inverse of features.detector_import.KEY_PREFIXES
_ORIGINAL = [("trunk.", "backbone.body."), ("rpn.", "rpn.head."), ("head.", "roi_heads.box.feature_extractor.head.layer4."),
             ("cls_score.", "roi_heads.box.predictor.cls_score."), ("bbox_pred.", "roi_heads.box.predictor.bbox_pred."),
             ("attribute.", "attribute.predictor.")]


def original_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our C4FasterRCNN's weights under AttrRCNN's names, with the anchor buffer and the attribute head's alias of
    the shared C5 head, as `state_dict()` of the original model lists them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in network.state_dict().items():
        for ours, theirs in _ORIGINAL:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value.clone()
                if ours == "head.":
                    out["attribute.feature_extractor.head.layer4." + key[len(ours):]] = value.clone()
                break
    out["rpn.anchor_generator.cell_anchors.0"] = network.cell_anchors.clone()
    return out


def write_tiny_vinvl_files(root: Path, network: torch.nn.Module) -> dict[str, Path]:
    """config.yaml, labelmap.json and model.pth (with `module.` prefixes and training leftovers) under root."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "vinvl_tiny.yaml"
    config.write_text(TINY_SGG_YAML)
    labelmap = root / "VG-SGG-dicts-tiny.json"
    labelmap.write_text(json.dumps({
        "label_to_idx": {name: i + 1 for i, name in enumerate(CLASSES)},
        "idx_to_label": {str(i + 1): name for i, name in enumerate(CLASSES)},
        "attribute_to_idx": {name: i + 1 for i, name in enumerate(ATTRIBUTES)},
        "idx_to_attribute": {str(i + 1): name for i, name in enumerate(ATTRIBUTES)},
    }))
    weights = root / "model_tiny.pth"
    model = {"module." + k: v for k, v in original_state_dict(network).items()}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}, "iteration": 90000},
               weights)
    return {"config": config, "labelmap": labelmap, "weights": weights}
