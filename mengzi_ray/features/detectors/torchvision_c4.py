"""`torchvision_c4` backend: Faster R-CNN C4 with VinVL's extraction semantics (oscar-formats.md §1.2).

Per image: RPN proposals → C5 box head → class probabilities → per-class NMS (IoU `nms_iou`) over every class with
score > `score_threshold`, each surviving box keeping its best class → best first, at most `max_boxes`; with fewer
than `min_boxes`, the best remaining proposals (by their best foreground score) fill up. With
`ignore_box_regression` the boxes are the proposals themselves (VinVL's TEST.IGNORE_BOX_REGRESSION).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms

from mengzi_ray import storage
from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.detectors.base import Detections
from mengzi_ray.features.detectors.c4_model import C4FasterRCNN
from mengzi_ray.text.tags import TagVocabulary

log = logging.getLogger(__name__)

# maskrcnn_benchmark's ROI-head box-coder weights (also torchvision's).
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def read_bytes(uri: str) -> bytes:
    """Whole file at a local path or s3:// URI."""
    fs, path = storage.filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _names(uri: str | None, expected: int | None, what: str, default: list[str] | None) -> list[str]:
    """A JSON list of names (of length `expected` unless None) from `uri`, or `default` when no uri is given."""
    names = json.loads(read_bytes(uri).decode("utf-8")) if uri else default
    if names is None:
        raise ValueError(f"{what}: no map file given")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{what} {uri}: expected a JSON list of non-empty names")
    if expected is not None and len(names) != expected:
        raise ValueError(f"{what} {uri or '(tag vocabulary)'}: {len(names)} names, the model has {expected}")
    return names


@dataclass
class LoadedC4:
    """A C4 network in eval mode with its label map (index 0 = background), attribute names and digest."""

    model: C4FasterRCNN
    labels: list[str]
    attributes: list[str] | None
    digest: str


def load_c4(section: DetectorSection) -> LoadedC4:
    """Build the network the section describes and load its weights (or random-init, seeded, with a warning)."""
    default_labels = list(TagVocabulary.default().as_dict())
    labels = _names(section.label_map, section.num_classes - 1, "label_map", default_labels)
    attributes = _names(section.attribute_map, None, "attribute_map", None) if section.attribute_map else None
    settings = section.model_dump(exclude={"weights", "allow_random_weights", "given_boxes_featurizer"})
    hasher = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)
        model = C4FasterRCNN(
            depth=section.depth,
            groups=section.groups,
            width_per_group=section.width_per_group,
            num_classes=section.num_classes,
            num_attributes=len(attributes) if attributes else 0,
            min_size=section.test_min_size,
            max_size=section.test_max_size,
            rpn_pre_nms_top_n=section.rpn_pre_nms_top_n,
            rpn_post_nms_top_n=section.rpn_post_nms_top_n,
        )
    if section.weights:
        from safetensors.torch import load as load_safetensors

        blob = read_bytes(section.weights)
        hasher.update(blob)
        model.load_state_dict(load_safetensors(blob), strict=True)
    else:
        log.warning("detector %s uses RANDOM weights (seed %d): its features are meaningless", section.backend,
                    section.seed)
        # Random box-regression layers shift the RPN's proposals by huge random deltas (the untrained trunk's
        # activations are large), clipping most of them to empty boxes; zeroed, the proposals are the anchors.
        for layer in (model.rpn.head.bbox_pred, model.bbox_pred):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        hasher.update(f"random-seed-{section.seed}".encode())
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedC4(model.eval(), ["__background__", *labels], attributes, hasher.hexdigest()[:12])


def select_regions(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    *,
    score_threshold: float,
    nms_iou: float,
    min_boxes: int,
    max_boxes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VinVL's region selection. probs: (P, C) with background at 0; boxes: (P, C, 4) per-class boxes.

    Returns (proposal indices, class indices ≥ 1, scores), best first, between min(min_boxes, P) and max_boxes long.
    """
    fg, boxes = probs[:, 1:].cpu(), boxes.cpu()
    idx, cls = torch.nonzero(fg > score_threshold, as_tuple=True)
    chosen: dict[int, tuple[int, float]] = {}
    if len(idx):
        scores = fg[idx, cls]
        keep = batched_nms(boxes[idx, cls + 1], scores, cls, nms_iou)
        for k in keep.tolist():  # keep is sorted by score, so the first class seen per proposal is its best
            chosen.setdefault(int(idx[k]), (int(cls[k]) + 1, float(scores[k])))
    ranked = sorted(chosen.items(), key=lambda item: -item[1][1])[:max_boxes]
    if len(ranked) < min_boxes:
        best_score, best_cls = fg.max(dim=1)
        taken = {i for i, _ in ranked}
        for i in torch.argsort(best_score, descending=True, stable=True).tolist():
            if len(ranked) >= min_boxes:
                break
            if i not in taken:
                ranked.append((i, (int(best_cls[i]) + 1, float(best_score[i]))))
    return (
        torch.tensor([i for i, _ in ranked], dtype=torch.long),
        torch.tensor([c for _, (c, _) in ranked], dtype=torch.long),
        torch.tensor([s for _, (_, s) in ranked], dtype=torch.float32),
    )


def to_tensors(images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """RGB uint8 (H, W, 3) arrays → (3, H, W) float32 in [0, 1]."""
    # np.array copies: decoded batches arrive as read-only views of Arrow buffers, which torch must not alias.
    return [torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0) for img in images]


class TorchvisionC4Detector:
    """The default detector: see the module docstring. Construct with from_config(section)."""

    def __init__(self, loaded: LoadedC4, section: DetectorSection) -> None:
        self.c4 = loaded
        self.section = section
        self.name = f"torchvision_c4:{loaded.digest}"
        self.coder = BoxCoder(BOX_CODER_WEIGHTS)

    @classmethod
    def from_config(cls, section: DetectorSection) -> "TorchvisionC4Detector":
        return cls(load_c4(section), section)

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[Detections]:
        """See Detector.detect; `boxes` is ignored (this backend proposes its own)."""
        if not images:
            return []
        model, s = self.c4.model, self.section
        batch, c4, scales = model.prepare(to_tensors(images))
        proposals = model.propose(batch, c4)
        pooled = model.region_features(c4, proposals)
        probs, deltas, attr_probs = model.classify(pooled)
        out, start = [], 0
        for i, props in enumerate(proposals):
            end = start + len(props)
            if s.ignore_box_regression:
                per_class = props[:, None, :].expand(-1, probs.shape[1], -1)
            else:
                per_class = self.coder.decode(deltas[start:end].reshape(len(props), -1), [props])
                per_class = per_class.reshape(len(props), -1, 4)
                h, w = batch.image_sizes[i]
                per_class = torch.stack(
                    [per_class[..., 0].clamp(0, w), per_class[..., 1].clamp(0, h),
                     per_class[..., 2].clamp(0, w), per_class[..., 3].clamp(0, h)], dim=-1
                )
            keep, cls, scores = select_regions(
                probs[start:end], per_class, score_threshold=s.score_threshold, nms_iou=s.nms_iou,
                min_boxes=s.min_boxes, max_boxes=s.max_boxes,
            )
            keep, cls = keep.to(probs.device), cls.to(probs.device)
            kept_boxes = per_class[keep, cls].cpu() * scales[i].repeat(2)
            attrs = None
            if attr_probs is not None and self.c4.attributes:
                top = attr_probs[start:end][keep][:, 1:].argmax(dim=1).cpu() + 1  # index 0 = "no attribute"
                attrs = [self.c4.attributes[j] for j in top.tolist()]
            out.append(
                Detections(
                    boxes=kept_boxes.numpy(),
                    scores=scores.numpy(),
                    labels=[self.c4.labels[c] for c in cls.tolist()],
                    attributes=attrs,
                    features=pooled[start:end][keep].cpu().numpy(),
                )
            )
            start = end
        return out
