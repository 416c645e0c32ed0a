"""`torchvision_c4` backend: VinVL's Faster R-CNN C4 inference (scene_graph_benchmark tools/test_sg_net.py), exact.

Per batch of decoded RGB images: resize (maskrcnn_benchmark data/transforms Resize: short side to test_min_size
unless the long side would pass test_max_size, PIL bilinear on the 8-bit image), to BGR 0-255 or RGB 0-1, normalise,
zero-pad to the batch's largest image → trunk → RPN proposals per image → C5 box head → class probabilities →
region selection (`nms_filter`) → attribute head on the detected boxes → boxes scaled back to original pixels.
Every setting comes from the `DetectorSection` (features/card.py); docs/detectors.md lists the original names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mengzi_ray import storage
from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.decode import resize_for_detector, resized_size  # noqa: F401  (resized_size: the rule, re-exported)
from mengzi_ray.features.detectors import rcnn_ops
from mengzi_ray.features.detectors.base import Detections
from mengzi_ray.features.detectors.c4_model import C4FasterRCNN
from mengzi_ray.features.detectors.detector_dir import names_from, resolve_detector
from mengzi_ray.text.tags import TagVocabulary

log = logging.getLogger(__name__)
# AttributePostProcessor's label 0 is "no attribute"; a zero score in a top-k slot means the slot is empty.
NO_ATTRIBUTE = ""


@dataclass
class LoadedC4:
    """A C4 network in eval mode with its class names (index 0 = background), attribute names, digest and the
    section it was built from, with any model_dir applied (detector_dir.resolve_detector)."""

    model: C4FasterRCNN
    labels: list[str]
    attributes: list[str] | None
    digest: str
    section: DetectorSection


def _names(uri: str | None, key: str, expected: int | None, default: list[str] | None) -> list[str]:
    """The `key` names of a label map file (see detector_dir.names_from), or `default` when no uri is given;
    `expected` is the length the model needs (None: any)."""
    names = names_from(uri, key) if uri else default
    if names is None:
        raise ValueError(f"{key}: no map file given")
    if expected is not None and len(names) != expected:
        raise ValueError(f"{key} of {uri or '(tag vocabulary)'}: {len(names)} names, the model has {expected}")
    return names


def build_network(section: DetectorSection, num_attributes: int) -> C4FasterRCNN:
    """The (randomly initialised) network a section describes, with an attribute head of `num_attributes`."""
    return C4FasterRCNN(
        depth=section.depth, groups=section.groups, width_per_group=section.width_per_group,
        stride_in_1x1=section.stride_in_1x1, num_classes=section.num_classes, num_attributes=num_attributes,
        stem_out_channels=section.stem_out_channels, res2_out_channels=section.res2_out_channels,
        anchor_sizes=section.anchor_sizes, anchor_ratios=section.anchor_ratios, anchor_stride=section.anchor_stride,
        pooler_resolution=section.pooler_resolution, pooler_sampling_ratio=section.pooler_sampling_ratio,
        cls_embedding_dim=section.cls_embedding_dim, attr_embedding_dim=section.attr_embedding_dim,
    )


def load_c4(section: DetectorSection) -> LoadedC4:
    """Build the network the (resolved) section describes and load its weights, or random-init it (seeded)."""
    section = resolve_detector(section)
    labels = _names(section.label_map, "classes", section.num_classes - 1, list(TagVocabulary.default().as_dict()))
    attributes = _names(section.attribute_map, "attributes", None, None) if section.attribute_map else None
    settings = section.model_dump(exclude={"weights", "label_map", "attribute_map", "model_dir", "allow_random_weights",
                                          "given_boxes_featurizer"})
    hasher = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)
        model = build_network(section, len(attributes) if attributes else 0)
    if section.weights:
        from safetensors.torch import load as load_safetensors

        blob = storage.read_bytes(section.weights)
        hasher.update(blob)
        model.load_state_dict(load_safetensors(blob), strict=True)
    else:
        log.warning("detector %s uses RANDOM weights (seed %d): its features are meaningless", section.backend,
                    section.seed)
        # Random box-regression layers shift the RPN's proposals by huge random deltas (the untrained trunk's
        # activations are large), clipping most of them to empty boxes; zeroed, the proposals are the anchors.
        for layer in (model.rpn.bbox_pred, model.bbox_pred):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        hasher.update(f"random-seed-{section.seed}".encode())
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedC4(model.eval(), ["__background__", *labels], attributes, hasher.hexdigest()[:12], section)


def preprocess(image: np.ndarray, section: DetectorSection) -> torch.Tensor:
    """RGB uint8 (H, W, 3) → the normalised (3, h, w) float32 input of the trunk (see the module docstring)."""
    resized = resize_for_detector(image, section.test_min_size, section.test_max_size)
    tensor = torch.from_numpy(resized).permute(2, 0, 1).contiguous().float().div(255)
    if section.input_format == "bgr255":
        tensor = tensor[[2, 1, 0]] * 255
    mean = torch.as_tensor(section.pixel_mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(section.pixel_std, dtype=torch.float32)[:, None, None]
    return tensor.sub_(mean).div_(std)


def pad_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """structures/image_list.py to_image_list (size_divisible 0): zero-pad to the largest height and width."""
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for t, slot in zip(tensors, batch):
        slot[:, : t.shape[1], : t.shape[2]].copy_(t)
    return batch


def rescale_boxes(boxes: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Boxes from an image of (h, w) `source` to one of `target`, as BoxList.resize does (one ratio when both axes
    agree): detections back to original pixels for convert_predictions_to_tsv, given boxes into the resized image."""
    ratio_w, ratio_h = float(target[1]) / float(source[1]), float(target[0]) / float(source[0])
    if ratio_w == ratio_h:
        return boxes * ratio_w
    return torch.stack([boxes[:, 0] * ratio_w, boxes[:, 1] * ratio_h, boxes[:, 2] * ratio_w, boxes[:, 3] * ratio_h],
                       dim=1)


class TorchvisionC4Detector:
    """The default detector: see the module docstring. Construct with from_config(section)."""

    def __init__(self, loaded: LoadedC4) -> None:
        self.c4 = loaded
        self.section = loaded.section
        self.name = f"torchvision_c4:{loaded.digest}"

    @classmethod
    def from_config(cls, section: DetectorSection) -> "TorchvisionC4Detector":
        return cls(load_c4(section))

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.c4.model.cls_score.weight.device.type
        if self.section.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.section.autocast == "bf16" else torch.float16
        return torch.autocast(device_type=device, dtype=dtype)

    def _select(self, probs: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's detections: (proposal indices, class ids, scores) by the section's nms_filter."""
        s = self.section
        if s.nms_filter == "best_class":
            return rcnn_ops.select_best_class(probs, boxes, score_threshold=s.score_threshold,
                                              min_detections=s.min_boxes, max_detections=s.max_boxes, nms_kind=s.nms)
        if s.nms_filter == "class_agnostic":
            flat = boxes[:, 0] if s.ignore_box_regression else boxes.mean(dim=1)
            return rcnn_ops.select_class_agnostic(probs, flat, score_threshold=s.score_threshold, nms_iou=s.nms_iou,
                                                  min_detections=s.min_boxes, max_detections=s.max_boxes,
                                                  nms_kind=s.nms)
        threshold = s.score_threshold
        found = rcnn_ops.select_per_class(probs, boxes, score_threshold=threshold, nms_iou=s.nms_iou,
                                          max_detections=s.max_boxes, nms_kind=s.nms)
        # PostProcessor.forward: below MIN_DETECTIONS_PER_IMG, halve the threshold and filter again, 10 times at most
        for _ in range(10):
            if len(found[0]) >= s.min_boxes:
                break
            threshold /= 2.0
            found = rcnn_ops.select_per_class(probs, boxes, score_threshold=threshold, nms_iou=s.nms_iou,
                                              max_detections=s.max_boxes, nms_kind=s.nms)
        return found

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[Detections]:
        """See Detector.detect; `boxes` is ignored (this backend proposes its own). The images form one padded
        batch, as maskrcnn_benchmark batches TEST.IMS_PER_BATCH images."""
        if not images:
            return []
        model, s = self.c4.model, self.section
        device = model.cls_score.weight.device
        inputs = [preprocess(img, s) for img in images]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in inputs]
        with self._autocast():
            c4 = model.trunk(pad_batch(inputs).to(device))
            objectness, rpn_deltas = model.rpn_outputs(c4)
        c4, objectness, rpn_deltas = c4.float(), objectness.float(), rpn_deltas.float()
        anchors = rcnn_ops.grid_anchors(model.cell_anchors, model.anchor_stride, c4.shape[2], c4.shape[3])
        proposals = rcnn_ops.rpn_proposals(
            anchors, objectness, rpn_deltas, sizes, pre_nms_top_n=s.rpn_pre_nms_top_n,
            post_nms_top_n=s.rpn_post_nms_top_n, nms_iou=s.rpn_nms_iou, min_size=s.rpn_min_size, nms_kind=s.nms,
        )
        with self._autocast():
            pooled = model.pooled_features(c4, [p for p, _ in proposals]).float()
            probs, deltas = model.classify(pooled)
        probs, deltas = probs.float(), deltas.float()
        chosen, start = [], 0
        for (props, _), (h, w) in zip(proposals, sizes):
            end = start + len(props)
            if s.ignore_box_regression:
                per_class = props.repeat(1, probs.shape[1])
            else:
                per_class = rcnn_ops.decode_boxes(deltas[start:end], props, s.box_coder_weights)
            per_class = rcnn_ops.clip_boxes(per_class.reshape(-1, 4), h, w).view(len(props), -1, 4)
            idx, cls, scores = self._select(probs[start:end], per_class)
            chosen.append((start + idx, cls, scores, per_class[idx, cls]))
            start = end
        attributes = self._attributes(c4, chosen) if model.attribute is not None and self.c4.attributes else None
        out = []
        for i, ((idx, cls, scores, det_boxes), img) in enumerate(zip(chosen, images)):
            names = attr_scores = top = None
            if attributes is not None:
                names, attr_scores = attributes[i]
                top = [n[0] if n else NO_ATTRIBUTE for n in names]
            out.append(Detections(
                boxes=rescale_boxes(det_boxes, sizes[i], img.shape[:2]).cpu().numpy(),
                scores=scores.cpu().numpy(),
                labels=[self.c4.labels[c] for c in cls.tolist()],
                attributes=top,
                features=pooled[idx].cpu().numpy(),
                attribute_lists=names,
                attribute_scores=attr_scores,
            ))
        return out

    def _attributes(self, c4: torch.Tensor, chosen: list) -> list[tuple[list[list[str]], list[list[float]]]]:
        """AttrRCNN's attribute head: the shared C5 head re-pools the detected boxes, class-conditioned logits,
        AttributePostProcessor per image → per image (names per box, scores per box), empty slots dropped."""
        model, s = self.c4.model, self.section
        counts = [len(c[0]) for c in chosen]
        if sum(counts) == 0:
            return [([], []) for _ in chosen]
        with self._autocast():
            pooled = model.pooled_features(c4, [c[3] for c in chosen]).float()
        probs = model.attribute_probs(pooled, torch.cat([c[1] for c in chosen])).float()
        out = []
        for part in probs.split(counts):
            labels, scores = rcnn_ops.select_attributes(part, threshold=s.attr_score_threshold,
                                                        max_per_image=s.max_attributes_per_image,
                                                        max_per_box=s.max_attributes_per_box)
            names, values = [], []
            for row_labels, row_scores in zip(labels.tolist(), scores.tolist()):
                kept = [(self.c4.attributes[a], v) for a, v in zip(row_labels, row_scores) if v > 0]
                names.append([n for n, _ in kept])
                values.append([v for _, v in kept])
            out.append((names, values))
        return out
