"""Detectors behind one contract (base.py): `torchvision_c4` (default), `given_boxes`, `detectron2` (if installed)."""

from mengzi_ray.features.detectors.base import Detections, Detector, build_detector, detections_to_row

__all__ = ["Detections", "Detector", "build_detector", "detections_to_row"]
