"""`mengzi-ray import-detector`: a released maskrcnn_benchmark / scene_graph_benchmark detector → a detector dir.

Inputs are the three files scene_graph_benchmark's `tools/test_sg_net.py` runs with: the checkpoint (`.pth`, e.g.
VinVL's `vinvl_vg_x152c4.pth`), the labelmap json (`VG-SGG-dicts-vgoi6-clipped.json`: `label_to_idx`,
`attribute_to_idx`, 1-based) and the yacs config (`sgg_configs/vgattr/vinvl_x152c4.yaml`) with the same trailing
`KEY VALUE` overrides test_sg_net.py takes. The config is merged over maskrcnn_benchmark's defaults for every key
inference reads (MASKRCNN_DEFAULTS), checked for what the C4 path supports, and mapped onto `DetectorSection`
fields; the checkpoint is read with `torch.load(weights_only=True)` and renamed to `C4FasterRCNN`'s keys, failing
with every missing, unused or mis-shaped weight named. Output: detector_dir.write_detector_dir.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
from typing import Any

import yaml

from mengzi_ray import storage
from mengzi_ray.features.detectors.detector_dir import write_detector_dir

# maskrcnn_benchmark/config/defaults.py and scene_graph_benchmark/config/sg_defaults.py, the keys inference reads.
MASKRCNN_DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN_ONLY": False,
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.RELATION_ON": False,
    "MODEL.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.BACKBONE.CONV_BODY": "R-50-C4",
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.TRANS_FUNC": "BottleneckWithFixedBatchNorm",
    "MODEL.RESNETS.STEM_FUNC": "StemWithFixedBatchNorm",
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.BACKBONE_OUT_CHANNELS": 1024,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.STAGE_WITH_DCN": (False, False, False, False),
    "MODEL.RPN.USE_FPN": False,
    "MODEL.RPN.ANCHOR_SIZES": (32, 64, 128, 256, 512),
    "MODEL.RPN.ANCHOR_STRIDE": (16,),
    "MODEL.RPN.ASPECT_RATIOS": (0.5, 1.0, 2.0),
    "MODEL.RPN.PRE_NMS_TOP_N_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOP_N_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.MIN_SIZE": 0,
    "MODEL.RPN.RPN_HEAD": "SingleConvRPNHead",
    "MODEL.ROI_HEADS.USE_FPN": False,
    "MODEL.ROI_HEADS.BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
    "MODEL.ROI_HEADS.SCORE_THRESH": 0.05,
    "MODEL.ROI_HEADS.NMS": 0.5,
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMG": 100,
    "MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG": 0,
    "MODEL.ROI_HEADS.NMS_FILTER": 0,
    "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR": "ResNet50Conv5ROIFeatureExtractor",
    "MODEL.ROI_BOX_HEAD.PREDICTOR": "FastRCNNPredictor",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_SCALES": (1.0 / 16,),
    "MODEL.ROI_BOX_HEAD.NUM_CLASSES": 81,
    "MODEL.ROI_BOX_HEAD.FORCE_BOXES": False,
    "MODEL.ATTRIBUTE_ON": False,
    "MODEL.ROI_ATTRIBUTE_HEAD.SHARE_BOX_FEATURE_EXTRACTOR": True,
    "MODEL.ROI_ATTRIBUTE_HEAD.PREDICTOR": "AttributeRCNNPredictor",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES": 401,
    "MODEL.ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM": 256,
    "MODEL.ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM": 512,
    "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG": 100,
    "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ": 16,
    "MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD": 0.0,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.PIXEL_MEAN": (102.9801, 115.9465, 122.7717),
    "INPUT.PIXEL_STD": (1.0, 1.0, 1.0),
    "INPUT.TO_BGR255": True,
    "DATALOADER.SIZE_DIVISIBILITY": 0,
    "TEST.IGNORE_BOX_REGRESSION": False,
    "TEST.BBOX_AUG.ENABLED": False,
}
# Settings the C4 path implements in one way only: (key, required value, what the value means).
_REQUIRED = [
    ("MODEL.RPN_ONLY", False, "an RPN-only model has no box head"),
    ("MODEL.MASK_ON", False, "mask heads are not part of feature extraction"),
    ("MODEL.KEYPOINT_ON", False, "keypoint heads are not part of feature extraction"),
    ("MODEL.RELATION_ON", False, "relation (scene-graph) heads are not supported"),
    ("MODEL.CLS_AGNOSTIC_BBOX_REG", False, "class-agnostic box regression is not supported"),
    ("MODEL.RPN.USE_FPN", False, "FPN detectors are not supported (C4 only)"),
    ("MODEL.ROI_HEADS.USE_FPN", False, "FPN detectors are not supported (C4 only)"),
    ("MODEL.RESNETS.TRANS_FUNC", "BottleneckWithFixedBatchNorm", "only frozen-BN bottlenecks are supported"),
    ("MODEL.RESNETS.STEM_FUNC", "StemWithFixedBatchNorm", "only the frozen-BN stem is supported"),
    ("MODEL.RESNETS.RES5_DILATION", 1, "a dilated C5 head is not supported"),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "the Oscar layout needs 2048-d region features"),
    ("MODEL.RESNETS.BACKBONE_OUT_CHANNELS", 1024, "C4 has 1024 channels"),
    ("MODEL.RESNETS.STAGE_WITH_DCN", (False, False, False, False), "deformable convolutions are not supported"),
    ("MODEL.RPN.ANCHOR_STRIDE", (16,), "C4 anchors have stride 16"),
    ("MODEL.RPN.RPN_HEAD", "SingleConvRPNHead", "only the single-conv RPN head is supported"),
    ("MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", "ResNet50Conv5ROIFeatureExtractor", "only the C5 box head is supported"),
    ("MODEL.ROI_BOX_HEAD.PREDICTOR", "FastRCNNPredictor", "only FastRCNNPredictor is supported"),
    ("MODEL.ROI_BOX_HEAD.POOLER_SCALES", (1.0 / 16,), "C4 pools at scale 1/16"),
    ("MODEL.ROI_BOX_HEAD.FORCE_BOXES", False, "given boxes are the given_boxes backend's job"),
    ("MODEL.ROI_ATTRIBUTE_HEAD.SHARE_BOX_FEATURE_EXTRACTOR", True, "the attribute head must share the C5 head"),
    ("MODEL.ROI_ATTRIBUTE_HEAD.PREDICTOR", "AttributeRCNNPredictor", "only AttributeRCNNPredictor is supported"),
    ("DATALOADER.SIZE_DIVISIBILITY", 0, "C4 batches are padded to their largest image only"),
    ("TEST.BBOX_AUG.ENABLED", False, "test-time augmentation is not supported"),
]
NMS_FILTERS = {0: "per_class", 1: "best_class", 2: "class_agnostic"}
NO_ATTRIBUTE = "__no_attribute__"


class DetectorImportError(ValueError):
    """A file given to import-detector is not what it must be; the message names the file and the problem."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _override_value(text: str) -> Any:
    """A command-line override value as yacs decodes it: a Python literal if it parses as one, else the string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def merged_config(config_uri: str, overrides: list[str]) -> dict[str, Any]:
    """maskrcnn_benchmark defaults ← the yaml file ← the KEY VALUE overrides, as a flat {dotted key: value}."""
    if len(overrides) % 2:
        raise DetectorImportError(f"overrides must be KEY VALUE pairs, got an odd number: {overrides}")
    try:
        tree = yaml.safe_load(storage.read_bytes(config_uri).decode("utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DetectorImportError(f"config {config_uri}: not a readable YAML file ({exc})") from None
    if not isinstance(tree, dict):
        raise DetectorImportError(f"config {config_uri}: expected a YAML mapping of config sections")
    config = dict(MASKRCNN_DEFAULTS)
    config.update(_flatten(tree))
    for key, value in zip(overrides[::2], overrides[1::2]):
        config[key] = _override_value(value)
    return config


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) < 1e-9
    return a == b


def settings_from_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The DetectorSection fields of a merged maskrcnn_benchmark config; unsupported settings raise."""
    problems = [f"{key} = {config[key]!r} ({why})" for key, want, why in _REQUIRED if not _close(config[key], want)]
    arch = config["MODEL.META_ARCHITECTURE"]
    if arch not in ("GeneralizedRCNN", "AttrRCNN"):
        problems.append(f"MODEL.META_ARCHITECTURE = {arch!r} (GeneralizedRCNN or AttrRCNN only)")
    body = re.fullmatch(r"R-(50|101|152)-C4", str(config["MODEL.BACKBONE.CONV_BODY"]))
    if body is None:
        problems.append(f"MODEL.BACKBONE.CONV_BODY = {config['MODEL.BACKBONE.CONV_BODY']!r} (R-50/101/152-C4 only)")
    if config["MODEL.ROI_HEADS.NMS_FILTER"] not in NMS_FILTERS:
        problems.append(f"MODEL.ROI_HEADS.NMS_FILTER = {config['MODEL.ROI_HEADS.NMS_FILTER']!r} (0, 1 or 2)")
    if problems:
        raise DetectorImportError(f"config {source}: not supported by the torchvision_c4 backend: "
                                  + "; ".join(problems))
    settings: dict[str, Any] = {
        "backend": "torchvision_c4",
        "depth": int(body.group(1)),
        "groups": config["MODEL.RESNETS.NUM_GROUPS"],
        "width_per_group": config["MODEL.RESNETS.WIDTH_PER_GROUP"],
        "stride_in_1x1": bool(config["MODEL.RESNETS.STRIDE_IN_1X1"]),
        "stem_out_channels": config["MODEL.RESNETS.STEM_OUT_CHANNELS"],
        "res2_out_channels": config["MODEL.RESNETS.RES2_OUT_CHANNELS"],
        "num_classes": config["MODEL.ROI_BOX_HEAD.NUM_CLASSES"],
        "input_format": "bgr255" if config["INPUT.TO_BGR255"] else "rgb01",
        "pixel_mean": [float(v) for v in config["INPUT.PIXEL_MEAN"]],
        "pixel_std": [float(v) for v in config["INPUT.PIXEL_STD"]],
        "exif_orientation": False,
        "test_min_size": int(config["INPUT.MIN_SIZE_TEST"]),
        "test_max_size": int(config["INPUT.MAX_SIZE_TEST"]),
        "anchor_sizes": [float(v) for v in config["MODEL.RPN.ANCHOR_SIZES"]],
        "anchor_ratios": [float(v) for v in config["MODEL.RPN.ASPECT_RATIOS"]],
        "rpn_pre_nms_top_n": config["MODEL.RPN.PRE_NMS_TOP_N_TEST"],
        "rpn_post_nms_top_n": config["MODEL.RPN.POST_NMS_TOP_N_TEST"],
        "rpn_nms_iou": float(config["MODEL.RPN.NMS_THRESH"]),
        "rpn_min_size": float(config["MODEL.RPN.MIN_SIZE"]),
        "pooler_resolution": config["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"],
        "pooler_sampling_ratio": config["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"],
        "box_coder_weights": [float(v) for v in config["MODEL.ROI_HEADS.BBOX_REG_WEIGHTS"]],
        "nms_filter": NMS_FILTERS[config["MODEL.ROI_HEADS.NMS_FILTER"]],
        "nms_iou": float(config["MODEL.ROI_HEADS.NMS"]),
        "score_threshold": float(config["MODEL.ROI_HEADS.SCORE_THRESH"]),
        "min_boxes": config["MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG"],
        "max_boxes": config["MODEL.ROI_HEADS.DETECTIONS_PER_IMG"],
        "ignore_box_regression": bool(config["TEST.IGNORE_BOX_REGRESSION"]),
    }
    if config["MODEL.ATTRIBUTE_ON"]:
        settings.update({
            "cls_embedding_dim": config["MODEL.ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM"],
            "attr_embedding_dim": config["MODEL.ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM"],
            "attr_score_threshold": float(config["MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD"]),
            "max_attributes_per_box": config["MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ"],
            "max_attributes_per_image": config["MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG"],
        })
    return settings


def _index_names(mapping: Any, count: int, what: str, source: str) -> list[str]:
    """{name: 1-based index} covering 1..count-1 → names in index order."""
    if not isinstance(mapping, dict):
        raise DetectorImportError(f"labelmap {source}: {what} must be a JSON object of name → index")
    by_index = {v: k for k, v in mapping.items() if isinstance(v, int)}
    wanted = set(range(1, count))
    if set(by_index) != wanted or len(by_index) != len(mapping):
        missing = sorted(wanted - set(by_index))[:10]
        extra = sorted(set(by_index) - wanted)[:10]
        raise DetectorImportError(f"labelmap {source}: {what} must map {count - 1} names to 1..{count - 1} "
                                  f"(the config's count); missing indices {missing}, unexpected {extra}")
    return [by_index[i] for i in range(1, count)]


def labelmap_names(labelmap_uri: str, config: dict[str, Any]) -> tuple[list[str], list[str] | None]:
    """VG-SGG-dicts json → (class names 1..C-1, attribute names 0..A-1 with 0 = no attribute, or None)."""
    try:
        data = yaml.safe_load(storage.read_bytes(labelmap_uri).decode("utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DetectorImportError(f"labelmap {labelmap_uri}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or "label_to_idx" not in data:
        raise DetectorImportError(f"labelmap {labelmap_uri}: expected a VG-SGG-dicts JSON object with label_to_idx")
    classes = _index_names(data["label_to_idx"], config["MODEL.ROI_BOX_HEAD.NUM_CLASSES"], "label_to_idx",
                           labelmap_uri)
    if not config["MODEL.ATTRIBUTE_ON"]:
        return classes, None
    if "attribute_to_idx" not in data:
        raise DetectorImportError(f"labelmap {labelmap_uri}: MODEL.ATTRIBUTE_ON needs attribute_to_idx")
    attributes = _index_names(data["attribute_to_idx"], config["MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES"],
                              "attribute_to_idx", labelmap_uri)
    return classes, [NO_ATTRIBUTE, *attributes]


# original key prefix (after any `module.`) → ours; None: derived from other weights, checked then dropped
KEY_PREFIXES: list[tuple[str, str | None]] = [
    ("backbone.body.", "trunk."),
    ("rpn.head.", "rpn."),
    ("rpn.anchor_generator.cell_anchors.", None),
    ("roi_heads.box.feature_extractor.head.layer4.", "head."),
    ("roi_heads.box.predictor.", ""),
    ("attribute.feature_extractor.head.layer4.", None),
    ("attribute.predictor.", "attribute."),
]


def read_checkpoint(uri: str) -> dict[str, Any]:
    """A maskrcnn_benchmark checkpoint → its model state dict (tensors), through torch.load(weights_only=True).

    Accepted: {"model": state dict, ...other entries (optimizer, scheduler, iteration)} or a bare state dict.
    """
    import torch

    data = storage.read_bytes(uri)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DetectorImportError(f"weights {uri}: refused — it holds objects other than tensors and plain values, "
                                  f"which a weights-only load does not unpickle ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise DetectorImportError(f"weights {uri}: not a torch checkpoint ({type(exc).__name__}: {exc})") from None
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise DetectorImportError(f"weights {uri}: expected a state dict or {{'model': state dict, ...}}, got "
                                  f"{type(loaded).__name__}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise DetectorImportError(f"weights {uri}: entries that are not tensors: {bad[:20]}")
    return state


def convert_state_dict(state: dict[str, Any], expected: dict[str, Any], source: str, anchors: Any) -> dict[str, Any]:
    """Rename an original state dict to C4FasterRCNN's keys and check it against `expected` (our model's state
    dict): every missing, unused or mis-shaped weight is named in one error. Derived entries (the anchor buffer,
    the attribute head's copy of the shared C5 head) must agree with what they duplicate."""
    import torch

    ours: dict[str, torch.Tensor] = {}
    shadows: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for prefix, target in KEY_PREFIXES:
            if name.startswith(prefix):
                if target is None:
                    shadows[name] = value
                else:
                    ours[target + name[len(prefix):]] = value
                break
        else:
            unused.append(key)
    unused += sorted(k for k in ours if k not in expected)
    missing = sorted(k for k in expected if k not in ours)
    shapes = sorted(f"{k}: file {tuple(ours[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in expected if k in ours and ours[k].shape != expected[k].shape)
    for name, value in shadows.items():
        if name.startswith("rpn.anchor_generator.") and not torch.equal(value.float(), anchors.float()):
            shapes.append(f"{name}: the file's anchors differ from the config's ANCHOR_SIZES / ASPECT_RATIOS")
        if name.startswith("attribute.feature_extractor."):
            twin = "head." + name[len("attribute.feature_extractor.head.layer4."):]
            if twin not in ours or not torch.equal(ours[twin], value):
                shapes.append(f"{name}: differs from the box head's {twin} (the attribute head shares it)")
    if missing or unused or shapes:
        parts = [f"{len(missing)} weights the model needs are missing: {missing}" if missing else "",
                 f"{len(unused)} weights nothing uses: {sorted(unused)}" if unused else "",
                 f"mismatched: {shapes}" if shapes else ""]
        raise DetectorImportError(f"weights {source}: " + "; ".join(p for p in parts if p))
    return {k: ours[k].detach().to(torch.float32).contiguous() for k in expected}


def run_import_detector(
    *, format: str, weights: str, labelmap: str, config: str, out: str, overrides: list[str]
) -> dict[str, Any]:
    """The import-detector command (see module docstring). Nothing is written unless every check passes.
    Returns {out, settings, classes, attributes, weights}."""
    if format != "maskrcnn_benchmark":
        raise DetectorImportError(
            f"--format {format}: only maskrcnn_benchmark is supported. A detectron2 model-zoo .pkl is a pickle we do "
            "not unpickle, and detectron2's C4 differs from maskrcnn_benchmark's (aligned ROIAlign, box coder "
            "without +1, anchor offsets, batch-norm epsilon), so renamed weights would not give its numbers: run it "
            "with detector.backend: detectron2 and detectron2 installed, which reads its own checkpoints")
    from safetensors.torch import save as save_safetensors

    from mengzi_ray.features.card import DetectorSection
    from mengzi_ray.features.detectors.torchvision_c4 import build_network

    merged = merged_config(config, overrides)
    settings = settings_from_config(merged, config)
    classes, attributes = labelmap_names(labelmap, merged)
    section = DetectorSection.model_validate({**settings, "allow_random_weights": True})
    network = build_network(section, len(attributes) if attributes else 0)
    converted = convert_state_dict(read_checkpoint(weights), network.state_dict(), weights, network.cell_anchors)
    write_detector_dir(out, save_safetensors(converted), classes, attributes, settings)
    return {"out": out, "settings": settings, "classes": len(classes),
            "attributes": len(attributes) if attributes else 0, "weights": len(converted)}
