"""One image's regions from the original files → a FeatureRecord (the 2054-d vector, boxes, labels, tags).

The original layouts carry an image's regions in three ways, all handled here:
- a feature row (`num_boxes` + base64 float32) next to a label row (`objects` with rect/class/conf) — VinVL
  features.tsv + predictions.tsv, the captioning feature/label tsvs, the retrieval features.tsv;
- objects that carry their own 2048-d `feature` (base64) — scene_graph_benchmark's predictions.tsv;
- a float tensor (N, 2054) from an Oscar-v1 `.pt` dict with a label list or string beside it.
Vectors of 2048 dims get Oscar's 6 box numbers appended from the rects and the image size; 2054-d vectors are
kept bit for bit (boxes then come from their rects, or back from the geometry part when a label has no rect).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from mengzi_ray.features.oscar_import.common import RowError
from mengzi_ray.features.oscar_import.outputs import FeatureRecord
from mengzi_ray.features.schema import APPEARANCE_DIM, REGION_DIM, box_geometry
from mengzi_ray.text.tags import TagVocabulary

OSCAR_DEFAULT_HW = (600, 800)  # Oscar's run_retrieval default (height, width) when a label row has no image_h/w


def decode_base64_floats(text: Any, num_boxes: Any, where: str) -> np.ndarray:
    """base64 of little-endian float32[num_boxes * D] → (num_boxes, D) float32. RowError("base64") when the text
    is not base64, RowError("feature_length") when its length does not split into num_boxes vectors of a known
    dimension (2048 or 2054)."""
    try:
        count = int(num_boxes)
        raw = base64.b64decode(str(text), validate=True)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise RowError("base64", f"{where}: feature is not base64 / num_boxes not an int ({exc})") from None
    if len(raw) % 4:
        raise RowError("feature_length", f"{where}: {len(raw)} bytes is not a whole number of float32")
    flat = np.frombuffer(raw, dtype="<f4")
    if count < 0 or (count == 0 and flat.size) or (count and flat.size % count):
        raise RowError("feature_length", f"{where}: {flat.size} floats do not split into {count} boxes")
    vectors = flat.reshape(count, -1) if count else flat.reshape(0, REGION_DIM)
    if vectors.shape[1] not in (APPEARANCE_DIM, REGION_DIM):
        raise RowError("feature_length", f"{where}: {vectors.shape[1]} floats per box, expected "
                                         f"{APPEARANCE_DIM} or {REGION_DIM}")
    return vectors.astype(np.float32)


def label_objects(label: Any, where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A label json (a dict with `objects` or a bare object list) → (objects, the dict's other keys)."""
    if isinstance(label, dict):
        objects, meta = label.get("objects", []), label
    else:
        objects, meta = label, {}
    if not isinstance(objects, list) or not all(isinstance(o, dict) and "class" in o for o in objects):
        raise RowError("labels", f"{where}: objects must be a list of objects with a 'class'")
    return objects, meta


def image_size(meta: dict[str, Any], hw: tuple[int, int] | None, where: str,
               default: tuple[int, int] | None = OSCAR_DEFAULT_HW) -> tuple[int, int]:
    """(height, width): a given hw first, then the label's image_h/image_w, then `default` (None: RowError)."""
    if hw is not None:
        return hw
    if "image_h" in meta and "image_w" in meta:
        try:
            return int(meta["image_h"]), int(meta["image_w"])
        except (TypeError, ValueError):
            raise RowError("image_size", f"{where}: image_h/image_w are not integers") from None
    if default is None:
        raise RowError("image_size", f"{where}: no image size (give the hw tsv)")
    return default


def size_from_geometry(vectors: np.ndarray, boxes: np.ndarray) -> tuple[int, int] | None:
    """(height, width) implied by 2054-d vectors and their pixel boxes ((x2-x1) / ((x2-x1)/W)), for labels that
    carry rects but no image size (bare object lists); None when the vectors have no usable geometry."""
    if vectors.shape[1] != REGION_DIM or not len(vectors):
        return None
    geometry = vectors[:, APPEARANCE_DIM:].astype(np.float64)
    sizes = []
    for extent, part in ((boxes[:, 3] - boxes[:, 1], geometry[:, 5]), (boxes[:, 2] - boxes[:, 0], geometry[:, 4])):
        ok = (part > 1e-6) & (extent > 0)
        if not ok.any():
            return None
        sizes.append(int(round(float(np.median(extent[ok] / part[ok])))))
    return (sizes[0], sizes[1]) if min(sizes) > 0 else None


def region_record(image_id: str, vectors: np.ndarray, label: Any, *, source: str, detector: str,
                  tags: TagVocabulary, where: str, hw: tuple[int, int] | None = None,
                  size_default: tuple[int, int] | None = OSCAR_DEFAULT_HW) -> FeatureRecord:
    """Regions (N, 2048 | 2054) + their label json → FeatureRecord. RowError("label_count") when the label lists
    a different number of objects, RowError("image_size") for a bad size. The size comes from `hw`, else the
    label's image_h/image_w, else the 2054-d geometry and the rects, else `size_default`.

    Keys our export adds to the label json (tags, source, detector) are read back, so an exported dataset
    re-imports bit for bit."""
    objects, meta = label_objects(label, where)
    has_rects = all(isinstance(o.get("rect"), list) and len(o["rect"]) == 4 for o in objects)
    if hw is None and not ("image_h" in meta and "image_w" in meta) and has_rects and len(objects) == len(vectors):
        hw = size_from_geometry(vectors, np.asarray([o["rect"] for o in objects], np.float32).reshape(-1, 4))
    height, width = image_size(meta, hw, where, size_default)
    if height <= 0 or width <= 0:
        raise RowError("image_size", f"{where}: image size {width}x{height} is not positive")
    if len(objects) != len(vectors):
        raise RowError("label_count", f"{where}: {len(vectors)} feature rows but {len(objects)} label objects")
    if vectors.shape[1] == APPEARANCE_DIM:
        if not has_rects:
            raise RowError("labels", f"{where}: 2048-d features need a rect per object for the box geometry")
        boxes = np.asarray([o["rect"] for o in objects], np.float32).reshape(-1, 4)
        vectors = np.concatenate([vectors, box_geometry(boxes, width, height)], axis=1)
    elif has_rects:
        boxes = np.asarray([o["rect"] for o in objects], np.float32).reshape(-1, 4)
    else:  # the geometry part holds x1/W, y1/H, x2/W, y2/H
        boxes = vectors[:, APPEARANCE_DIM : APPEARANCE_DIM + 4] * np.float32([width, height, width, height])
    labels = [str(o["class"]) for o in objects]
    try:
        stored_tags = meta.get("tags") or tags.translate(labels).tags
        scores = [float(o.get("conf", 1.0)) for o in objects]
    except (TypeError, ValueError) as exc:
        raise RowError("labels", f"{where}: {exc}") from None
    # scene_graph_benchmark writes `attributes` + `attr_scores` lists per object when asked; ours carry the top one
    has_lists = bool(objects) and all(isinstance(o.get("attr_scores"), list) for o in objects)
    attribute_lists = [[str(a) for a in o.get("attributes", [])] for o in objects] if has_lists else []
    try:
        attribute_scores = [[float(v) for v in o["attr_scores"]] for o in objects] if has_lists else []
    except (TypeError, ValueError) as exc:
        raise RowError("labels", f"{where}: attr_scores: {exc}") from None
    if has_lists:
        attributes = [names[0] if names else "" for names in attribute_lists]
    else:
        attributes = [str(o["attributes"][0]) for o in objects if o.get("attributes")]
    return FeatureRecord(
        image_id=image_id,
        source=str(meta.get("source", source)),
        width=width,
        height=height,
        boxes=boxes,
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        scores=scores,
        labels=labels,
        tags=list(stored_tags),
        detector=str(meta.get("detector", detector)),
        attributes=attributes if len(attributes) == len(objects) else [],
        attribute_lists=attribute_lists,
        attribute_scores=attribute_scores,
    )


def objects_with_features(label: Any, where: str) -> np.ndarray:
    """scene_graph_benchmark objects each carrying `feature` (base64 float32[2048]) → (N, 2048)."""
    objects, _ = label_objects(label, where)
    rows = [decode_base64_floats(o.get("feature", ""), 1, f"{where} object {i}") for i, o in enumerate(objects)]
    if not rows:
        return np.zeros((0, APPEARANCE_DIM), np.float32)
    dims = {r.shape[1] for r in rows}
    if len(dims) != 1:
        raise RowError("feature_length", f"{where}: objects have features of different sizes {sorted(dims)}")
    return np.concatenate(rows, axis=0)


def label_from_string(text: str) -> list[dict[str, Any]]:
    """An Oscar-v1 label that is a plain tag string ("dog grass") → objects with a class each."""
    return [{"class": word} for word in text.split()]
