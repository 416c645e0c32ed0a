"""The detector contract: a batch of RGB images → per image boxes, scores, labels, attributes, 2048-d features.

Every backend (`torchvision_c4`, `given_boxes`, `detectron2`) implements :class:`Detector`; the extraction job
(`features/extract.py`) and the serving app call only this module: :func:`build_detector` turns a validated
`DetectorSection` (features/card.py) into a detector, and :func:`detections_to_row` turns one image's
:class:`Detections` into a row of the region-feature table (2054-d Oscar vectors + Chinese tags).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from mengzi_ray.features.schema import APPEARANCE_DIM, feature_row
from mengzi_ray.text.tags import TagVocabulary

if TYPE_CHECKING:
    from mengzi_ray.features.card import DetectorSection


@dataclass
class Detections:
    """What a detector found in one image, in detector output order (Oscar keeps the first regions).

    boxes: (N, 4) float32, x1, y1, x2, y2 in original-image pixels.
    scores: (N,) float32 confidence of each box's label.
    labels: N English class names, as the detector's label map has them.
    attributes: N top attribute names where the detector has an attribute head ("" for none), else None.
    features: (N, 2048) float32 pooled region features (the representation before the classifier).
    attribute_lists / attribute_scores: per box, every attribute the attribute head kept and its score, best first
    (scene_graph_benchmark's `attributes` / `attr_scores`), or None without an attribute head.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    attributes: list[str] | None
    features: np.ndarray
    attribute_lists: list[list[str]] | None = None
    attribute_scores: list[list[float]] | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.features = np.asarray(self.features, dtype=np.float32).reshape(-1, APPEARANCE_DIM)
        n = len(self.boxes)
        sizes = {"scores": len(self.scores), "labels": len(self.labels), "features": len(self.features)}
        for name in ("attributes", "attribute_lists", "attribute_scores"):
            value = getattr(self, name)
            if value is not None:
                sizes[name] = len(value)
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"Detections: {n} boxes but {wrong}")


@runtime_checkable
class Detector(Protocol):
    """A loaded detector. One instance per process (an actor, a Serve replica); not thread-safe.

    `name` is the backend plus a digest of its weights/settings: it is written to the `detector` column so that
    datasets mixing detectors are detectable.
    """

    name: str

    def detect(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[Detections]:
        """images: RGB uint8 (H, W, 3) arrays at original size (see features.decode.decode_image).

        boxes: for the `given_boxes` backend, one (N_i, 4) x1,y1,x2,y2 pixel array per image (None for an image
        without given boxes is an error there); the other backends ignore it. Returns one Detections per image.
        """
        ...


def build_detector(section: "DetectorSection") -> Detector:
    """The detector a card section asks for; heavy imports (torch, detectron2) happen here, not at import time."""
    if section.backend == "torchvision_c4":
        from mengzi_ray.features.detectors.torchvision_c4 import TorchvisionC4Detector

        return TorchvisionC4Detector.from_config(section)
    if section.backend == "given_boxes":
        from mengzi_ray.features.detectors.given_boxes import GivenBoxesDetector

        return GivenBoxesDetector.from_config(section)
    if section.backend == "detectron2":
        from mengzi_ray.features.detectors.detectron2_backend import Detectron2Detector

        return Detectron2Detector.from_config(section)
    raise ValueError(f"unknown detector backend {section.backend!r}")


def detections_to_row(
    detections: Detections,
    *,
    image_id: str,
    source: str,
    width: int,
    height: int,
    detector: str,
    vocabulary: TagVocabulary | None = None,
) -> dict[str, Any]:
    """One FEATURES_SCHEMA row: 2054-d Oscar vectors (appearance + box geometry) and Chinese tags.

    width, height: the decoded image size the boxes refer to. vocabulary: label → Chinese tag (default: the
    shipped Visual Genome vocabulary; unknown labels keep their English text).
    """
    vocab = vocabulary or TagVocabulary.default()
    return feature_row(
        image_id=image_id,
        source=source,
        width=width,
        height=height,
        boxes=detections.boxes,
        appearance=detections.features,
        scores=detections.scores.tolist(),
        labels=detections.labels,
        tags=vocab.translate(detections.labels).tags if detections.labels else [],
        detector=detector,
        attributes=detections.attributes,
        attribute_lists=detections.attribute_lists,
        attribute_scores=detections.attribute_scores,
    )
