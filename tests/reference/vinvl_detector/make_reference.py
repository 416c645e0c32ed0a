#!/usr/bin/env python
"""Ground-truth outputs of the ORIGINAL scene_graph_benchmark VinVL C4 inference.

Runs microsoft/scene_graph_benchmark (maskrcnn_benchmark + AttrRCNN), checked
out OUTSIDE this repository, on tiny random-weight configs and three skimage
photos, and writes compressed .npz references plus the configs / labelmap /
state-dict manifests a re-implementation needs.  See README.md in this folder.

    PYTHONPATH=$SCRATCH/pydeps python tests/reference/vinvl_detector/make_reference.py \
        --sgb $SCRATCH/sgb --out tests/reference/vinvl_detector/

Nothing of the original is copied here: it is imported from --sgb.  Import-time
shims (installed by install_shims) are listed in README.md.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import math
import os
import os.path as op
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections import OrderedDict

import numpy as np
import torch
import torchvision

HERE = op.dirname(op.abspath(__file__))
sys.path.insert(0, HERE)
import weights as W  # noqa: E402

# ---------------------------------------------------------------------------
# fixed inputs of the reference
# ---------------------------------------------------------------------------
IMAGES = ["astronaut.png", "chelsea.png", "coffee.png"]  # files of skimage/data
CLASSES = [
    "person", "cat", "dog", "cup", "table", "chair", "window", "shirt", "hair",
    "face", "hand", "plate", "wall", "floor", "tree", "sky", "flower", "eye",
    "ear", "spoon",
]
ATTRIBUTES = [
    "white", "black", "blue", "red", "brown", "green", "wooden", "orange",
    "striped", "small", "large", "metal", "round", "smiling", "open", "short",
    "long", "dark", "yellow", "silver",
]
# the command-line options of the VinVL feature-extraction command (seed command)
SEED_OPTS = [
    "MODEL.ROI_HEADS.NMS_FILTER", "1",
    "MODEL.ROI_HEADS.SCORE_THRESH", "0.2",
    "TEST.IGNORE_BOX_REGRESSION", "True",
    "MODEL.ATTRIBUTE_ON", "True",
    "TEST.OUTPUT_FEATURE", "True",
]
# keys copied verbatim from sgg_configs/vgattr/vinvl_x152c4.yaml (it has no _BASE_)
# then tiny-model overrides; DATASETS.TRAIN/TEST/FACTORY_* dropped (no dataset is
# built) and LABELMAP_FILE pointed at the tiny labelmap.
COMMON_YAML = OrderedDict([
    ("MODEL.META_ARCHITECTURE", "AttrRCNN"),
    ("MODEL.RESNETS.BACKBONE_OUT_CHANNELS", 1024),
    ("MODEL.RPN.PRE_NMS_TOP_N_TEST", 1000),        # vinvl: 6000
    ("MODEL.RPN.POST_NMS_TOP_N_TEST", 100),        # vinvl: 300
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 384),
    ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.5),
    ("MODEL.ROI_HEADS.SCORE_THRESH", 0.2),
    ("MODEL.ROI_HEADS.DETECTIONS_PER_IMG", 20),    # vinvl: 100
    ("MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG", 10),
    ("MODEL.ROI_BOX_HEAD.NUM_CLASSES", len(CLASSES) + 1),              # vinvl: 1595
    ("MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES", len(ATTRIBUTES) + 1),  # vinvl: 525
    ("MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD", 0.05),
    ("MODEL.ATTRIBUTE_ON", True),
    ("INPUT.MIN_SIZE_TEST", 320),                  # vinvl: 600
    ("INPUT.MAX_SIZE_TEST", 480),                  # vinvl: 1000
    ("INPUT.PIXEL_MEAN", [103.530, 116.280, 123.675]),
    ("DATASETS.LABELMAP_FILE", "VG-SGG-dicts-tiny.json"),
    ("DATALOADER.NUM_WORKERS", 0),
    ("TEST.IMS_PER_BATCH", 1),
    ("TEST.SKIP_PERFORMANCE_EVAL", True),
    ("TEST.SAVE_PREDICTIONS", True),
    ("TEST.SAVE_RESULTS_TO_TSV", True),
    ("TEST.TSV_SAVE_SUBSET", ["rect", "class", "conf", "feature"]),
    ("TEST.GATHER_ON_CPU", True),
    ("DATA_DIR", "."),
])
CONFIGS = OrderedDict([
    ("r50", OrderedDict([
        ("MODEL.BACKBONE.CONV_BODY", "R-50-C4"),
        ("MODEL.RESNETS.STRIDE_IN_1X1", True),
        ("MODEL.RESNETS.NUM_GROUPS", 1),
        ("MODEL.RESNETS.WIDTH_PER_GROUP", 16),
    ])),
    ("x", OrderedDict([
        ("MODEL.BACKBONE.CONV_BODY", "R-152-C4"),   # same stage layout as X152-C4
        ("MODEL.RESNETS.STRIDE_IN_1X1", False),
        ("MODEL.RESNETS.NUM_GROUPS", 4),            # vinvl: 32
        ("MODEL.RESNETS.WIDTH_PER_GROUP", 4),       # vinvl: 8
    ])),
])
SEEDS = {"r50": 1234, "x": 4321}
# added to the calibrated background logit bias (cls_score.bias[0]); chosen by hand
# so that one image gets fewer than MIN_DETECTIONS_PER_IMG boxes >= SCORE_THRESH
# (fill-up) and another more than DETECTIONS_PER_IMG (cut)
BG_SHIFT = {"r50": 8.0, "x": 8.5}
# (case name, config, nms variant, batches of image indices)
CASES = [
    ("r50_torchvision_single", "r50", "torchvision", [[0], [1], [2]]),
    ("r50_legacy_single", "r50", "legacy", [[0], [1], [2]]),
    ("x_torchvision_single", "x", "torchvision", [[0], [1], [2]]),
    ("x_legacy_single", "x", "legacy", [[0], [1], [2]]),
    ("r50_torchvision_batch2", "r50", "torchvision", [[0, 1]]),
]
N_PROPOSALS_KEPT = 100  # == POST_NMS_TOP_N_TEST: all of them


# ---------------------------------------------------------------------------
# shims
# ---------------------------------------------------------------------------
def legacy_nms(dets: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Port of maskrcnn_benchmark/csrc/cpu/nms_cpu.cpp at 462a68f^ (float32 maths).

    areas (x2-x1+1)*(y2-y1+1); order = scores.sort(0, descending=True) (ties:
    stable, i.e. lower index first); j is suppressed when
    inter/(area_i+area_j-inter) >= threshold with inter using +1 widths; the
    result is nonzero(suppressed == 0): kept indices in ASCENDING INDEX order
    (not in score order, unlike torchvision.ops.nms).
    """
    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    dets = dets.detach().cpu()
    scores = scores.detach().cpu()
    x1, y1, x2, y2 = (dets[:, k].contiguous() for k in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    n = dets.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool)
    thr = torch.tensor(threshold, dtype=dets.dtype)
    one = torch.tensor(1, dtype=dets.dtype)
    zero = torch.tensor(0, dtype=dets.dtype)
    for _i in range(n):
        i = int(order[_i])
        if suppressed[i]:
            continue
        rest = order[_i + 1:]
        if rest.numel() == 0:
            break
        xx1 = torch.maximum(x1[i], x1[rest])
        yy1 = torch.maximum(y1[i], y1[rest])
        xx2 = torch.minimum(x2[i], x2[rest])
        yy2 = torch.minimum(y2[i], y2[rest])
        w = torch.maximum(zero, xx2 - xx1 + one)
        h = torch.maximum(zero, yy2 - yy1 + one)
        inter = w * h
        ovr = inter / ((areas[i] + areas[rest]) - inter)
        suppressed[rest[ovr >= thr]] = True
    return torch.nonzero(~suppressed).squeeze(1)


def roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    """_C.roi_align_forward(input, rois, scale, ph, pw, sampling_ratio) of the
    pre-462a68f extension == torchvision roi_align with aligned=False."""
    return torchvision.ops.roi_align(
        input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, aligned=False
    )


SHIM_NOTES = []


def _bare_package(name: str, path: str):
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__file__ = op.join(path, "__init__.py")
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def install_shims(sgb: str) -> None:
    sgb = op.abspath(sgb)
    sys.path.insert(0, sgb)
    # numpy>=1.24 removed the np.float alias used by rpn/anchor_generator.py (dtype only)
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
        SHIM_NOTES.append("np.float = float (anchor_generator.generate_anchors dtype)")
    # torch._six is gone; utils/imports.py only reads torch._six.PY3
    if not hasattr(torch, "_six"):
        torch._six = types.SimpleNamespace(PY3=True)  # type: ignore[attr-defined]
        SHIM_NOTES.append("torch._six = SimpleNamespace(PY3=True) (utils/imports.py)")
    # utils/model_zoo.py (URL checkpoints only, never used here) imports a private name
    import torch.hub as torch_hub
    if not hasattr(torch_hub, "_download_url_to_file"):
        torch_hub._download_url_to_file = torch_hub.download_url_to_file
        SHIM_NOTES.append("torch.hub._download_url_to_file = torch.hub.download_url_to_file "
                          "(utils/model_zoo.py import; URL checkpoints are not used)")
    # the compiled extension: only the two ops the C4 inference path can reach
    fake_c = types.ModuleType("maskrcnn_benchmark._C")
    fake_c.nms = legacy_nms
    fake_c.roi_align_forward = roi_align_forward
    sys.modules["maskrcnn_benchmark._C"] = fake_c
    SHIM_NOTES.append("maskrcnn_benchmark._C = {nms: legacy C++ CPU port, roi_align_forward: "
                      "torchvision roi_align(aligned=False)}; nothing else")
    import maskrcnn_benchmark  # noqa: F401  (its __init__ is empty)
    maskrcnn_benchmark._C = fake_c
    # maskrcnn_benchmark/data/__init__.py imports every dataset (cityscapesscripts,
    # pycocotools, ...); register the two packages without running their __init__
    # so that data.transforms and data.datasets.utils import from the real files.
    _bare_package("maskrcnn_benchmark.data", op.join(sgb, "maskrcnn_benchmark", "data"))
    _bare_package("maskrcnn_benchmark.data.datasets",
                  op.join(sgb, "maskrcnn_benchmark", "data", "datasets"))
    ev = _bare_package("maskrcnn_benchmark.data.datasets.evaluation",
                       op.join(sgb, "maskrcnn_benchmark", "data", "datasets", "evaluation"))

    def evaluate(*a, **k):  # never called: TEST.SKIP_PERFORMANCE_EVAL
        raise RuntimeError("evaluation is not part of the reference")

    ev.evaluate = evaluate
    SHIM_NOTES.append("maskrcnn_benchmark.data, .data.datasets registered as bare packages "
                      "(their __init__ imports all datasets); .data.datasets.evaluation "
                      "replaced by a module whose evaluate() raises (never called)")


def _original_modules():
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n.startswith("maskrcnn_benchmark") or n.startswith("scene_graph_benchmark"))]


def set_variant(variant: str) -> list:
    """'torchvision': the HEAD code as is (layers/nms.py and layers/roi_align.py
    pick torchvision.ops.nms / roi_align).  'legacy': what the code did before
    462a68f: nms = _C.nms (C++ CPU op) and roi_align = _ROIAlign.apply
    (-> _C.roi_align_forward).  Rebinds every module-level name that holds one
    of the two nms functions."""
    ra_mod = sys.modules["maskrcnn_benchmark.layers.roi_align"]
    tv_nms = torchvision.ops.nms
    want = tv_nms if variant == "torchvision" else legacy_nms
    patched = []
    for mod in _original_modules():
        if mod.__name__ == "maskrcnn_benchmark._C":
            continue  # _C.nms stays the legacy op
        for k, v in list(vars(mod).items()):
            if v is tv_nms or v is legacy_nms:
                if v is not want:
                    setattr(mod, k, want)
                patched.append(f"{mod.__name__}.{k}")
    ra_mod.roi_align = torchvision.ops.roi_align if variant == "torchvision" else ra_mod._ROIAlign.apply
    patched.append("maskrcnn_benchmark.layers.roi_align.roi_align")
    return sorted(set(patched))


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
def skimage_data_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is needed only for its bundled photos (skimage/data/*.png)")
    return op.join(list(spec.submodule_search_locations)[0], "data")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def labelmap_dict() -> dict:
    """VG-SGG-dicts json layout (what load_labelmap_file / the tsv writer read)."""
    return {
        "label_to_idx": {c: i + 1 for i, c in enumerate(CLASSES)},
        "idx_to_label": {str(i + 1): c for i, c in enumerate(CLASSES)},
        "attribute_to_idx": {a: i + 1 for i, a in enumerate(ATTRIBUTES)},
        "idx_to_attribute": {str(i + 1): a for i, a in enumerate(ATTRIBUTES)},
        "predicate_to_idx": {},
        "idx_to_predicate": {},
        "object_count": {c: 1 for c in CLASSES},
        "attribute_count": {a: 1 for a in ATTRIBUTES},
        "predicate_count": {},
    }


def _yaml_value(v):
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return repr(v)


def config_yaml_text(name: str) -> str:
    flat = OrderedDict(COMMON_YAML)
    flat.update(CONFIGS[name])
    tree: "OrderedDict" = OrderedDict()
    for key, val in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, OrderedDict())
        node[parts[-1]] = val

    lines = [f"# tiny random-weight analogue of sgg_configs/vgattr/vinvl_x152c4.yaml ({name});",
             "# generated by make_reference.py.  Use with the seed opts listed in cases.json.",
             "# LABELMAP_FILE is resolved like test_sg_net: as given, else DATA_DIR/<file>."]

    def emit(node, indent):
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 4)
            else:
                lines.append(" " * indent + f"{k}: {_yaml_value(v)}")
    emit(tree, 0)
    return "\n".join(lines) + "\n"


def opts_for(batch_size: int, data_dir: str) -> list:
    return SEED_OPTS + ["MODEL.DEVICE", "cpu", "TEST.IMS_PER_BATCH", str(batch_size), "DATA_DIR", data_dir]


def build_cfg(yaml_path: str, opts: list):
    from maskrcnn_benchmark.config import cfg as global_cfg
    from scene_graph_benchmark.config import sg_cfg
    cfg = build_cfg.pristine.clone()
    cfg.set_new_allowed(True)
    cfg.merge_from_other_cfg(sg_cfg)
    cfg.set_new_allowed(False)
    cfg.merge_from_file(yaml_path)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------
# running the original
# ---------------------------------------------------------------------------
class _FakeDataset:
    """What convert_predictions_to_tsv needs from the dataset: key and original size."""

    def __init__(self, keys, sizes):
        self.keys, self.sizes = keys, sizes

    def get_img_key(self, idx):
        return self.keys[idx]

    def get_img_info(self, idx):
        w, h = self.sizes[idx]
        return {"width": w, "height": h}


def build_model(cfg, ckpt_path):
    from scene_graph_benchmark.AttrRCNN import AttrRCNN
    from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer
    model = AttrRCNN(cfg)  # tools/test_sg_net.py: META_ARCHITECTURE == "AttrRCNN"
    model.to(cfg.MODEL.DEVICE)
    with tempfile.TemporaryDirectory() as save_dir:
        checkpointer = DetectronCheckpointer(cfg, model, save_dir=save_dir)
        checkpointer.load(ckpt_path, use_latest=False)
    model.eval()
    return model


def run_case(name, cfg_name, variant, batches, ctx, out_dir, tmp):
    from maskrcnn_benchmark.data.transforms import build_transforms
    from maskrcnn_benchmark.structures.image_list import to_image_list
    from maskrcnn_benchmark.engine.inference import convert_predictions_to_tsv
    from maskrcnn_benchmark.data.datasets.utils.load_files import config_dataset_file
    from PIL import Image

    patched = set_variant(variant)
    bs = max(len(b) for b in batches)
    cfg = build_cfg(op.join(out_dir, f"config_{cfg_name}.yaml"), opts_for(bs, op.abspath(out_dir)))
    model = ctx["models"].get(cfg_name)
    if model is None or ctx["model_bs"].get(cfg_name) != cfg.TEST.IMS_PER_BATCH:
        # the model does not depend on IMS_PER_BATCH, but build it from this cfg to be exact
        model = build_model(cfg, ctx["ckpt"][cfg_name])
        ctx["models"][cfg_name], ctx["model_bs"][cfg_name] = model, cfg.TEST.IMS_PER_BATCH
    transforms = build_transforms(cfg, is_train=False)

    captured = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("features", o)),
        model.rpn.register_forward_hook(lambda m, i, o: captured.__setitem__("proposals", o[0])),
        model.roi_heads.box.register_forward_hook(lambda m, i, o: captured.__setitem__("box_out", o)),
        model.attribute.predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("attr_logits", o[0])),
    ]
    # instrumentation only: before each real call of the box post-processor's
    # filter (filter_results_peter for NMS_FILTER 1), call it once more with no
    # min/max detection limits to count the boxes passing SCORE_THRESH before
    # the MIN_DETECTIONS fill-up / DETECTIONS_PER_IMG cut.  The returned
    # detections are those of the unmodified call.
    pp = model.roi_heads.box.post_processor
    orig_filter = pp.filter_method
    passing = []

    def counting_filter(boxlist, num_classes, feature=None):
        saved = pp.detections_per_img, pp.min_detections_per_img
        pp.detections_per_img, pp.min_detections_per_img = 10 ** 9, 0
        try:
            passing.append(len(orig_filter(boxlist, num_classes, feature)))
        finally:
            pp.detections_per_img, pp.min_detections_per_img = saved
        return orig_filter(boxlist, num_classes, feature)

    pp.filter_method = counting_filter
    arrays = {}
    images_meta = []
    predictions = {}
    keys, sizes = [], []
    t0 = time.time()
    flat_index = 0
    for b, batch in enumerate(batches):
        tensors, scales, orig = [], [], []
        for ii in batch:
            path = ctx["image_paths"][ii]
            img = Image.open(path).convert("RGB")  # data/datasets/utils/image_ops.img_from_base64
            w, h = img.size
            t, _ = transforms(img, None)
            new_img_size = t.shape[1:]
            scale = math.sqrt(float(new_img_size[0] * new_img_size[1]) / float(w * h))  # tsv_dataset.__getitem__
            tensors.append(t)
            scales.append(scale)
            orig.append((w, h))
        image_list = to_image_list(tensors, cfg.DATALOADER.SIZE_DIVISIBILITY)  # BatchCollator
        passing.clear()
        with torch.no_grad():
            output = model(image_list.to(torch.device(cfg.MODEL.DEVICE)), None)
        output = [o.to(torch.device("cpu")) for o in output]
        batch_tensor = image_list.tensors
        attr_probs = torch.softmax(captured["attr_logits"], -1).split([len(o) for o in output])
        for k, ii in enumerate(batch):
            p = f"img{flat_index}_"
            det = output[k]
            props = captured["proposals"][k]
            feat = captured["features"][0][k]
            box_x, box_dets, _ = captured["box_out"]
            arrays[p + "input_chw"] = np.asarray(tensors[k].shape, dtype=np.int64)
            arrays[p + "input_checksum"] = np.array(
                [tensors[k].double().sum().item(), tensors[k].double().abs().sum().item()], dtype=np.float64)
            arrays[p + "input_corner"] = tensors[k][:, :4, :4].numpy().astype(np.float32)
            arrays[p + "c4_shape"] = np.asarray(feat.shape, dtype=np.int64)
            arrays[p + "c4_checksum"] = np.array(
                [feat.double().sum().item(), feat.double().abs().sum().item()], dtype=np.float64)
            arrays[p + "c4_corner"] = feat[:8, :4, :4].numpy().astype(np.float32)
            arrays[p + "rpn_num"] = np.array(len(props), dtype=np.int64)
            arrays[p + "rpn_boxes"] = props.bbox[:N_PROPOSALS_KEPT].numpy().astype(np.float32)
            arrays[p + "rpn_objectness"] = props.get_field("objectness")[:N_PROPOSALS_KEPT].numpy().astype(np.float32)
            arrays[p + "det_boxes_resized"] = det.bbox.numpy().astype(np.float32)
            arrays[p + "det_labels"] = det.get_field("labels").numpy().astype(np.int64)
            arrays[p + "det_scores"] = det.get_field("scores").numpy().astype(np.float32)
            arrays[p + "det_scores_all"] = det.get_field("scores_all").numpy().astype(np.float32)
            arrays[p + "det_attr_labels"] = det.get_field("attr_labels").numpy().astype(np.int64)
            arrays[p + "det_attr_scores"] = det.get_field("attr_scores").numpy().astype(np.float32)
            scores = det.get_field("scores")
            assert len(passing) == len(batch), passing  # NMS_FILTER 1 never re-enters the while loop here
            images_meta.append({
                "index": flat_index,
                "image": IMAGES[ii],
                "batch": b,
                "position_in_batch": k,
                "orig_wh": list(orig[k]),
                "resized_hw": [int(tensors[k].shape[1]), int(tensors[k].shape[2])],
                "batch_tensor_shape": list(batch_tensor.shape),
                "det_boxlist_size_wh": list(det.size),
                "scale": scales[k],
                "num_proposals": len(props),
                "num_detections": len(det),
                "num_det_ge_thresh": int((scores >= cfg.MODEL.ROI_HEADS.SCORE_THRESH).sum()),
                "num_passing_before_limits": passing[k],
                "num_attr_probs_above_thresh": int((attr_probs[k][:, 1:] > cfg.MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD).sum()),
                "min_detections_fill_up": bool(passing[k] < cfg.MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG),
                "detections_per_img_cut": bool(passing[k] > cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMG),
            })
            predictions[flat_index] = det
            keys.append(f"{IMAGES[ii].rsplit('.', 1)[0]}")
            sizes.append(orig[k])
            flat_index += 1
    seconds = time.time() - t0
    for h in hooks:
        h.remove()
    pp.filter_method = orig_filter

    # the original tsv writer (engine/inference.py convert_predictions_to_tsv) with the
    # config's TSV_SAVE_SUBSET plus the attribute fields it knows how to write
    subset = list(cfg.TEST.TSV_SAVE_SUBSET) + ["attr_labels", "attr_scores"]
    labelmap_file = config_dataset_file(cfg.DATA_DIR, cfg.DATASETS.LABELMAP_FILE)
    tsv_dir = op.join(tmp, name)
    os.makedirs(tsv_dir, exist_ok=True)
    convert_predictions_to_tsv(predictions, _FakeDataset(keys, sizes), tsv_dir, data_subset=subset,
                               labelmap_file=labelmap_file, relation_on=False,
                               output_tsv_name="predictions.tsv")
    with open(op.join(tsv_dir, "predictions.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    assert [r[0] for r in rows] == keys, (rows, keys)
    for idx, (key, js) in enumerate(rows):
        objs = json.loads(js)["objects"]
        p = f"img{idx}_"
        arrays[p + "rect"] = np.array([o["rect"] for o in objs], dtype=np.float32).reshape(-1, 4)
        arrays[p + "conf"] = np.array([o["conf"] for o in objs], dtype=np.float32)
        arrays[p + "feature"] = np.stack(
            [np.frombuffer(base64.b64decode(o["feature"]), dtype=np.float32) for o in objs]
        ) if objs else np.zeros((0, 2048), np.float32)
        arrays[p + "class_names"] = np.array([o["class"] for o in objs], dtype=np.str_)
        arrays[p + "attr_names"] = np.array([o["attributes"] for o in objs], dtype=np.str_)
        arrays[p + "attr_conf"] = np.array([o["attr_scores"] for o in objs], dtype=np.float32)
        arrays[p + "bbox_id"] = np.array([o["bbox_id"] for o in objs], dtype=np.int64)
        # sanity: the writer's conf/rect are the BoxList's float32 values
        assert np.array_equal(arrays[p + "conf"], arrays[p + "det_scores"])
        images_meta[idx]["tsv_row_chars"] = len(js)
    npz = op.join(out_dir, f"{name}.npz")
    np.savez_compressed(npz, **arrays)
    return {
        "name": name,
        "config": cfg_name,
        "config_file": f"config_{cfg_name}.yaml",
        "opts": opts_for(bs, "<this folder>"),
        "nms": variant,
        "patched_names": patched,
        "batches": [[IMAGES[i] for i in b] for b in batches],
        "npz": op.basename(npz),
        "seconds": round(seconds, 2),
        "images": images_meta,
    }, arrays


# targets of the calibration (see calibrate): std of the logits across anchors / RoIs
OBJ_LOGIT_STD = 2.0
CLS_LOGIT_STD = 2.5
ATTR_LOGIT_STD = 1.5


def calibrate(cfg, shapes, seed, anchor_consts, image_tensors, bg_shift=0.0):
    """Data-dependent scale/centering of the four prediction layers, so that random
    features (which share a large positive mean after ReLU + avg-pool) give
    objectness / class / attribute logits that vary from anchor to anchor and
    RoI to RoI instead of one class winning everywhere.

    For a layer y = W x + b with captured inputs X (all anchors / RoIs of the
    three photos, torchvision nms): W <- s*W with s = TARGET / mean_k std(X W_k^T)
    and b <- b - (s*W) mean(X) (the drawn bias is kept as an offset).  The scales
    and biases are stored in shapes_<cfg>.json ("scales", "constants"), so the
    checkpoint is rebuilt without any data.  Run layer by layer (RPN, box
    classifier, attribute head) because each changes what the next one sees."""
    from scene_graph_benchmark.AttrRCNN import AttrRCNN
    from maskrcnn_benchmark.structures.image_list import to_image_list
    set_variant("torchvision")
    model = AttrRCNN(cfg)
    model.eval()
    consts, scales = dict(anchor_consts), {}

    def state():
        return W.make_state_dict(shapes, seed, constants=consts, scales=scales)

    def capture(module):
        caps = []
        h = module.register_forward_hook(lambda m, i, o: caps.append(i[0].detach().clone()))
        model.load_state_dict(state())
        with torch.no_grad():
            for t in image_tensors:
                model(to_image_list([t], 0), None)
        h.remove()
        return caps

    def fit(wkey, bkey, X, target, skip_first=False):
        sd = state()
        w = sd[wkey].reshape(sd[wkey].shape[0], -1).double()
        z = X.double() @ w.T
        zs = z[:, 1:] if skip_first else z
        s = float(target / zs.std(0).mean())
        scales[wkey] = s
        sd = state()
        w = sd[wkey].reshape(sd[wkey].shape[0], -1).double()
        b0 = W.make_state_dict(shapes, seed, constants={k: v for k, v in anchor_consts.items()})[bkey].double()
        consts[bkey] = (b0 - w @ X.double().mean(0)).float().tolist()
        return s

    rep = {}
    T = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, c.shape[1]) for c in capture(model.rpn.head.cls_logits)])
    rep["rpn.head.cls_logits"] = fit("rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias", T, OBJ_LOGIT_STD)
    X = torch.cat([c.mean((2, 3)) for c in capture(model.roi_heads.box.predictor)])
    rep["roi_heads.box.predictor.cls_score"] = fit(
        "roi_heads.box.predictor.cls_score.weight", "roi_heads.box.predictor.cls_score.bias", X, CLS_LOGIT_STD,
        skip_first=True)
    consts["roi_heads.box.predictor.cls_score.bias"][0] += bg_shift
    A = torch.cat(capture(model.attribute.predictor.fc_attr))
    rep["attribute.predictor.fc_attr"] = fit(
        "attribute.predictor.fc_attr.weight", "attribute.predictor.fc_attr.bias", A, 1.0)
    F = torch.cat(capture(model.attribute.predictor.attr_score))
    rep["attribute.predictor.attr_score"] = fit(
        "attribute.predictor.attr_score.weight", "attribute.predictor.attr_score.bias", F, ATTR_LOGIT_STD,
        skip_first=True)
    return consts, scales, rep


def dets_signature(arrays, i):
    p = f"img{i}_"
    return (arrays[p + "det_boxes_resized"].tobytes(), arrays[p + "det_labels"].tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--sgb", required=True, help="scene_graph_benchmark checkout")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cases", default="", help="comma list of case names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = op.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()

    install_shims(args.sgb)
    from maskrcnn_benchmark.config import cfg as global_cfg
    build_cfg.pristine = global_cfg.clone()
    from scene_graph_benchmark.AttrRCNN import AttrRCNN  # noqa: F401

    sgb_commit = subprocess.run(["git", "-C", args.sgb, "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()

    # images (bytes from the installed scikit-image; nothing image-wise is committed)
    ddir = skimage_data_dir()
    image_paths = [op.join(ddir, n) for n in IMAGES]

    # labelmap + configs
    with open(op.join(out_dir, "VG-SGG-dicts-tiny.json"), "w") as f:
        json.dump(labelmap_dict(), f, indent=1)
    for name in CONFIGS:
        with open(op.join(out_dir, f"config_{name}.yaml"), "w") as f:
            f.write(config_yaml_text(name))

    tmp = tempfile.mkdtemp(prefix="vinvl_ref_")
    ctx = {"models": {}, "model_bs": {}, "ckpt": {}, "image_paths": image_paths}
    manifests = {}
    try:
        for name in CONFIGS:
            cfg = build_cfg(op.join(out_dir, f"config_{name}.yaml"), opts_for(1, out_dir))
            with open(op.join(out_dir, f"config_{name}.full.yaml"), "w") as f:
                f.write(cfg.dump().replace(out_dir, "<this folder>").replace(op.abspath(args.sgb), "<sgb>"))
            from scene_graph_benchmark.AttrRCNN import AttrRCNN
            skeleton = AttrRCNN(cfg)
            sd = skeleton.state_dict()
            shapes = OrderedDict((k, list(v.shape)) for k, v in sd.items())
            anchors = {k: v.tolist() for k, v in sd.items() if "anchor_generator.cell_anchors" in k}
            from maskrcnn_benchmark.data.transforms import build_transforms
            from PIL import Image
            tr = build_transforms(cfg, is_train=False)
            calib_images = [tr(Image.open(p).convert("RGB"), None)[0] for p in image_paths]
            constants, scales, rep = calibrate(cfg, shapes, SEEDS[name], anchors, calib_images,
                                              bg_shift=BG_SHIFT[name])
            print(f"[calibrate] {name}: weight scales {rep}", flush=True)
            manifest = {"shapes": shapes, "constants": constants, "scales": scales,
                        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()},
                        "num_tensors": len(shapes),
                        "num_elements": int(sum(v.numel() for v in sd.values()))}
            with open(op.join(out_dir, f"shapes_{name}.json"), "w") as f:
                json.dump(manifest, f, indent=0)
            manifests[name] = manifest
            weights_sd = W.make_state_dict(shapes, SEEDS[name], constants=constants, scales=scales)
            ckpt = op.join(tmp, f"tiny_{name}.pth")
            W.save_checkpoint(weights_sd, ckpt)
            ctx["ckpt"][name] = ckpt
            model = build_model(cfg, ckpt)
            loaded = model.state_dict()
            for k, v in weights_sd.items():  # the Checkpointer loaded exactly our tensors
                assert torch.equal(loaded[k], v), k
            ctx["models"][name], ctx["model_bs"][name] = model, 1
            del skeleton

        wanted = set(filter(None, args.cases.split(",")))
        results, all_arrays = [], {}
        for name, cfg_name, variant, batches in CASES:
            if wanted and name not in wanted:
                continue
            print(f"[case] {name}", flush=True)
            meta, arrays = run_case(name, cfg_name, variant, batches, ctx, out_dir, tmp)
            results.append(meta)
            all_arrays[name] = arrays
            for im in meta["images"]:
                print(f"   {im['image']}: resized {im['resized_hw']} props {im['num_proposals']} "
                      f"dets {im['num_detections']} (passing {im['num_passing_before_limits']}) "
                      f"classes {list(all_arrays[name]['img%d_class_names' % im['index']][:6])}", flush=True)

        # checks the issue asks for
        checks = {}
        for cfg_name in CONFIGS:
            a = all_arrays.get(f"{cfg_name}_torchvision_single")
            b = all_arrays.get(f"{cfg_name}_legacy_single")
            if a is None or b is None:
                continue
            diff_final = [i for i in range(len(IMAGES)) if dets_signature(a, i) != dets_signature(b, i)]
            diff_rpn = [i for i in range(len(IMAGES))
                        if not np.array_equal(a[f"img{i}_rpn_boxes"], b[f"img{i}_rpn_boxes"])
                        or int(a[f"img{i}_rpn_num"]) != int(b[f"img{i}_rpn_num"])]
            checks[f"{cfg_name}: images whose final detections differ torchvision vs legacy nms"] = diff_final
            checks[f"{cfg_name}: images whose RPN proposals differ torchvision vs legacy nms"] = diff_rpn
            assert diff_final, f"{cfg_name}: nms variants indistinguishable"
        for meta in results:
            for im in meta["images"]:
                assert im["num_det_ge_thresh"] > 0, (meta["name"], im)
        fill = [(m["name"], im["image"]) for m in results for im in m["images"] if im["min_detections_fill_up"]]
        cut = [(m["name"], im["image"]) for m in results for im in m["images"] if im["detections_per_img_cut"]]
        checks["images where MIN_DETECTIONS_PER_IMG fill-up happened"] = fill
        checks["images where DETECTIONS_PER_IMG cut happened"] = cut
        a = all_arrays.get("r50_torchvision_single")
        b = all_arrays.get("r50_torchvision_batch2")
        if a is not None and b is not None:
            checks["r50 batch2 vs single: images whose detections differ (padding effect)"] = [
                IMAGES[i] for i in range(2) if dets_signature(a, i) != dets_signature(b, i)]
        print(json.dumps(checks, indent=1))
        assert fill, "no image exercised the MIN_DETECTIONS_PER_IMG fill-up"

        cases = {
            "generator": "tests/reference/vinvl_detector/make_reference.py",
            "sgb_commit": sgb_commit,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "pillow": __import__("PIL").__version__,
            "shims": SHIM_NOTES,
            "images": [{"file": n, "source": "skimage/data/" + n, "sha256": sha256(p)}
                       for n, p in zip(IMAGES, image_paths)],
            "seed_opts": SEED_OPTS,
            "configs": {n: {"file": f"config_{n}.yaml", "full_dump": f"config_{n}.full.yaml",
                            "overrides_vs_vinvl_x152c4": dict(CONFIGS[n]), "common_yaml": dict(COMMON_YAML),
                            "weights_seed": SEEDS[n], "shapes": f"shapes_{n}.json",
                            "num_tensors": manifests[n]["num_tensors"],
                            "num_elements": manifests[n]["num_elements"]}
                        for n in CONFIGS},
            "labelmap": "VG-SGG-dicts-tiny.json",
            "npz_keys_per_image": sorted({k.split("_", 1)[1] for arr in all_arrays.values() for k in arr}),
            "checks": checks,
            "cases": results,
            "total_seconds": round(time.time() - t_start, 1),
        }
        with open(op.join(out_dir, "cases.json"), "w") as f:
            json.dump(cases, f, indent=1)
        print(f"total {time.time() - t_start:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
