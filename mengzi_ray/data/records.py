"""Feature rows ⨝ text rows on image_id, in one process (pyarrow only). The Ray Data join of the training jobs
produces the same records at scale; this is the path for tests, the demo and single-process evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray import storage
from mengzi_ray.storage import json_lines
from mengzi_ray.text import tag_string


@dataclass
class ImageRecord:
    """One image: its regions (N, 2054) float32 (a read-only view of the Arrow buffer), its tag string and every
    text of one kind attached to it."""

    image_id: str
    features: np.ndarray
    od_labels: str
    texts: list[str]
    texts_b: list[str | None] | None = None  # each text's own text_b (Oscar+ corpus rows), when the rows have one

    def text_b(self, index: int = 0) -> str:
        """text_b of text `index`: its own (tags or QA answers) when the row has one, else the image's tags."""
        own = self.texts_b[index] if self.texts_b else None
        return own if own else self.od_labels


def read_text_rows(uri: str | Path) -> list[dict]:
    """Rows of a text jsonl (image_id, text, kind, split), local or s3://: the one reader of text rows for training,
    evaluation and serving. `image_id` is always a string (`123` and `"123"` name the same image, as in the feature
    dataset, whose image_id column is a string); a bad line is an error naming file and line."""
    rows = []
    text = storage.read_bytes(str(uri)).decode("utf-8")
    for number, row in json_lines(text, str(uri)):
        if not isinstance(row, dict):
            raise ValueError(f"{uri} line {number}: expected a JSON object, got {type(row).__name__}")
        missing = {"image_id", "text", "kind", "split"} - set(row)
        if missing:
            raise ValueError(f"{uri} line {number}: missing fields {sorted(missing)}")
        if isinstance(row["image_id"], (dict, list, bool)) or row["image_id"] is None:
            raise ValueError(f"{uri} line {number}: image_id must be a string or an integer, got {row['image_id']!r}")
        row["image_id"] = str(row["image_id"])
        rows.append(row)
    return rows


def load_image_records(features_path: str | Path, text_path: str | Path, split: str, kind: str = "caption") -> list[ImageRecord]:
    """Join features and texts of `split` on image_id, in the features' order. Texts whose image has no features
    are an error (they would silently shrink the dataset); images without texts of the split are skipped."""
    table = pq.read_table(features_path, columns=["image_id", "features", "tags"], memory_map=True)
    texts: dict[str, list[str]] = {}
    for row in read_text_rows(text_path):
        if row["split"] == split and row["kind"] == kind:
            texts.setdefault(row["image_id"], []).append(row["text"])
    ids = table.column("image_id").to_pylist()
    orphans = set(texts) - set(ids)
    if orphans:
        raise ValueError(f"{text_path}: {len(orphans)} {split} texts name images with no features, e.g. {sorted(orphans)[:3]}")
    records = []
    for image_id, feats, tags in zip(ids, region_arrays_of(table), table.column("tags").to_pylist()):
        if image_id in texts:
            records.append(ImageRecord(image_id, feats, tag_string(tags), texts[image_id]))
    if not records:
        raise ValueError(f"{text_path}: no {kind} texts for split {split!r}")
    return records
