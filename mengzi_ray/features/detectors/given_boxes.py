"""`given_boxes` backend: region features for boxes supplied with each image (bottom-up's "given boxes" mode).

Two featurizers (DetectorSection.given_boxes_featurizer):
- `torchvision_c4`: the C4 detector's box head on the given boxes (2048-d pooled feature); label and score are the
  box classifier's best foreground class and its probability;
- `pixel_crops`: features.pixel_regions (deterministic, no model): the featurizer of the synthetic dataset, so
  extracting the synthetic images with their box manifest reproduces its features; label "object", score 1
  (the extraction job replaces labels with the manifest's when it has them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.detectors.base import Detections
from mengzi_ray.features.pixel_regions import PIXEL_DETECTOR_NAME, pixel_region_features

UNLABELLED = "object"


def _checked_boxes(images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
    """One (N_i, 4) float32 array per image, or ValueError naming the image index."""
    if boxes is None or len(boxes) != len(images):
        raise ValueError(f"given_boxes needs one box array per image: {len(images)} images, boxes={boxes!r:.80}")
    out = []
    for i, b in enumerate(boxes):
        if b is None:
            raise ValueError(f"given_boxes: image {i} has no boxes")
        arr = np.asarray(b, dtype=np.float32)
        if arr.size == 0:
            arr = arr.reshape(0, 4)
        if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
            raise ValueError(f"given_boxes: image {i}: boxes must be finite (N, 4) x1,y1,x2,y2, got {arr.shape}")
        out.append(arr)
    return out


class GivenBoxesDetector:
    """See the module docstring. Construct with from_config(section)."""

    def __init__(self, section: DetectorSection) -> None:
        self.section = section
        self.c4 = None
        if section.given_boxes_featurizer == "torchvision_c4":
            from mengzi_ray.features.detectors.torchvision_c4 import load_c4

            self.c4 = load_c4(section)
            self.section = self.c4.section
            self.name = f"given_boxes:{self.c4.digest}"
        else:
            self.name = PIXEL_DETECTOR_NAME

    @classmethod
    def from_config(cls, section: DetectorSection) -> "GivenBoxesDetector":
        return cls(section)

    def detect(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[Detections]:
        """See Detector.detect: boxes are required, one (N_i, 4) pixel array per image; order is kept."""
        given = _checked_boxes(images, boxes)
        if self.c4 is None:
            return [
                Detections(
                    boxes=b, scores=np.ones(len(b), np.float32), labels=[UNLABELLED] * len(b), attributes=None,
                    features=pixel_region_features(img, b),
                )
                for img, b in zip(images, given)
            ]
        return self._detect_c4(images, given)

    def _detect_c4(self, images: Sequence[np.ndarray], given: list[np.ndarray]) -> list[Detections]:
        """The C4 box head on the given boxes (scene_graph_benchmark's FORCE_BOXES path): each box keeps its best
        foreground class; attributes are conditioned on it."""
        import torch

        from mengzi_ray.features.detectors.torchvision_c4 import pad_batch, preprocess, rescale_boxes

        model = self.c4.model
        device = model.cls_score.weight.device
        inputs = [preprocess(img, self.section) for img in images]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in inputs]
        with torch.no_grad():
            c4 = model.trunk(pad_batch(inputs).to(device))
            resized = [rescale_boxes(torch.from_numpy(b).float(), img.shape[:2], size).to(device)
                       for b, img, size in zip(given, images, sizes)]
            pooled = model.pooled_features(c4, resized)
            probs, _ = model.classify(pooled)
            best_score, best_cls = probs[:, 1:].max(dim=1)
            best_cls = best_cls + 1
            attr_probs = model.attribute_probs(pooled, best_cls) if model.attribute is not None else None
        out, start = [], 0
        for b in given:
            end = start + len(b)
            attrs = None
            if attr_probs is not None and self.c4.attributes:
                attrs = [self.c4.attributes[j] for j in (attr_probs[start:end, 1:].argmax(dim=1) + 1).tolist()]
            out.append(
                Detections(
                    boxes=b,
                    scores=best_score[start:end].cpu().numpy(),
                    labels=[self.c4.labels[c] for c in best_cls[start:end].tolist()],
                    attributes=attrs,
                    features=pooled[start:end].cpu().numpy(),
                )
            )
            start = end
        return out
