"""`detectron2` backend: a detectron2 Faster R-CNN (config YAML + weights) under the same Detections contract.

detectron2 has no PyPI wheel; DetectorSection refuses this backend at card validation when it is not importable
(with build instructions). Boxes, scores and classes come from the model's own inference (its config sets NMS,
score threshold and detections per image); the 2048-d feature per kept box is the box head's pooled output
re-computed on the final boxes (the bottom-up-attention recipe for detectron2 C4 models).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mengzi_ray.features.card import DetectorSection
from mengzi_ray.features.detectors.base import Detections
from mengzi_ray.storage import read_bytes


class Detectron2Detector:
    """Wraps a detectron2 GeneralizedRCNN with a Res5ROIHeads (C4) box head; see the module docstring."""

    def __init__(self, section: DetectorSection) -> None:
        import hashlib
        import tempfile

        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        cfg = get_cfg()
        cfg.merge_from_file(section.detectron2_config, allow_unsafe=False)  # never yaml.unsafe_load a config
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        cfg.INPUT.MIN_SIZE_TEST = section.test_min_size
        cfg.INPUT.MAX_SIZE_TEST = section.test_max_size
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = section.score_threshold
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = section.nms_iou
        cfg.TEST.DETECTIONS_PER_IMAGE = section.max_boxes
        self.model = build_model(cfg).eval()
        blob = read_bytes(section.weights)
        with tempfile.NamedTemporaryFile(suffix=".pth") as f:
            f.write(blob)
            f.flush()
            DetectionCheckpointer(self.model).load(f.name)
        self.labels = self._label_names(cfg, section)
        self.name = f"detectron2:{hashlib.sha256(blob).hexdigest()[:12]}"
        self.min_size, self.max_size = section.test_min_size, section.test_max_size

    @staticmethod
    def _label_names(cfg, section: DetectorSection) -> list[str]:
        import json

        if section.label_map:
            return json.loads(read_bytes(section.label_map).decode("utf-8"))
        from detectron2.data import MetadataCatalog

        names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
        if not names:
            raise ValueError("detectron2 backend: set detector.label_map (no thing_classes in the config's dataset)")
        return list(names)

    @classmethod
    def from_config(cls, section: DetectorSection) -> "Detectron2Detector":
        return cls(section)

    def detect(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[Detections]:
        """See Detector.detect; detectron2 models take BGR 0-255 CHW tensors with the original height/width."""
        import torch
        from detectron2.structures import Boxes

        inputs = [
            {"image": torch.as_tensor(img[:, :, ::-1].copy()).permute(2, 0, 1).float(), "height": img.shape[0],
             "width": img.shape[1]}
            for img in images
        ]
        with torch.no_grad():
            results = self.model(inputs)
            batched = self.model.preprocess_image(inputs)
            c4 = self.model.backbone(batched.tensor)
            heads = self.model.roi_heads
            out = []
            for i, result in enumerate(results):
                inst = result["instances"].to("cpu")
                h, w = batched.image_sizes[i]
                scale = torch.tensor([w / images[i].shape[1], h / images[i].shape[0]] * 2)
                resized = Boxes((inst.pred_boxes.tensor * scale).to(c4[heads.in_features[0]].device))
                pooled = heads._shared_roi_transform(
                    [c4[f][i : i + 1] for f in heads.in_features], [resized]
                ).mean(dim=(2, 3))
                out.append(
                    Detections(
                        boxes=inst.pred_boxes.tensor.numpy(),
                        scores=inst.scores.numpy(),
                        labels=[self.labels[c] for c in inst.pred_classes.tolist()],
                        attributes=None,
                        features=pooled.cpu().numpy(),
                    )
                )
        return out
