"""Streaming writers of an import's outputs: `features/part-NNNNN.parquet` (FEATURES_SCHEMA) and `text.jsonl`.

Region vectors go from numpy straight into Arrow buffers (no Python floats), a few images per record batch, so
the writer's memory is bounded by `BATCH_IMAGES` images whatever the number of rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray.features.schema import FEATURES_SCHEMA, REGION_DIM

BATCH_IMAGES = 32  # images per record batch (a row group)
IMAGES_PER_FILE = 2000  # images per part file


@dataclass
class FeatureRecord:
    """One image of FEATURES_SCHEMA with numpy region arrays: boxes (N, 4) pixels, vectors (N, 2054)."""

    image_id: str
    source: str
    width: int
    height: int
    boxes: np.ndarray
    vectors: np.ndarray
    scores: list[float]
    labels: list[str]
    tags: list[str]
    detector: str
    attributes: list[str] = field(default_factory=list)


def _nested(arrays: list[np.ndarray], width: int) -> pa.ListArray:
    """Per-image (N_i, width) float32 arrays → list<fixed_size_list<float32, width>>."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def records_table(records: list[FeatureRecord]) -> pa.Table:
    """FeatureRecords → a FEATURES_SCHEMA table (region columns built from numpy without Python floats)."""
    columns = {
        "image_id": pa.array([r.image_id for r in records], pa.string()),
        "source": pa.array([r.source for r in records], pa.string()),
        "width": pa.array([r.width for r in records], pa.int32()),
        "height": pa.array([r.height for r in records], pa.int32()),
        "boxes": _nested([r.boxes for r in records], 4),
        "features": _nested([r.vectors for r in records], REGION_DIM),
        "scores": pa.array([r.scores for r in records], pa.list_(pa.float32())),
        "labels": pa.array([r.labels for r in records], pa.list_(pa.string())),
        "tags": pa.array([r.tags for r in records], pa.list_(pa.string())),
        "attributes": pa.array([r.attributes for r in records], pa.list_(pa.string())),
        "detector": pa.array([r.detector for r in records], pa.string()),
    }
    return pa.Table.from_arrays([columns[f.name] for f in FEATURES_SCHEMA], schema=FEATURES_SCHEMA)


class FeatureWriter:
    """Appends FeatureRecords to `<root>/features/part-NNNNN.parquet`, IMAGES_PER_FILE images per file."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.dir = fs, f"{root}/features"
        fs.create_dir(self.dir, recursive=True)
        self.pending: list[FeatureRecord] = []
        self.writer: pq.ParquetWriter | None = None
        self.files, self.in_file, self.written = 0, 0, 0

    def add(self, record: FeatureRecord) -> None:
        self.pending.append(record)
        if len(self.pending) >= BATCH_IMAGES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            path = f"{self.dir}/part-{self.files:05d}.parquet"
            self.writer = pq.ParquetWriter(path, FEATURES_SCHEMA, filesystem=self.fs)
            self.files += 1
        self.writer.write_table(records_table(self.pending))
        self.in_file += len(self.pending)
        self.written += len(self.pending)
        self.pending = []
        if self.in_file >= IMAGES_PER_FILE:
            self.writer.close()
            self.writer, self.in_file = None, 0

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TextWriter:
    """Appends text rows (image_id, text, kind, split[, text_b, ...]) to `<root>/text.jsonl`."""

    def __init__(self, fs: pafs.FileSystem, root: str, name: str = "text.jsonl") -> None:
        self.stream = fs.open_output_stream(f"{root}/{name}")
        self.written = 0

    def add(self, row: dict[str, Any]) -> None:
        self.stream.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.written += 1

    def close(self) -> None:
        self.stream.close()
