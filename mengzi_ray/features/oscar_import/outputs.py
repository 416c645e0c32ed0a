"""An import's outputs: streaming writers of `features/part-NNNNN.parquet` (FEATURES_SCHEMA) and `text.jsonl`,
and `ImportRun`, which holds them with the bad-row log, the tag map and the set of image ids written.

Region vectors go from numpy straight into Arrow buffers (no Python floats), a few images per record batch, so
the writer's memory is bounded by `BATCH_IMAGES` images whatever the number of rows. Every format module receives
an ImportRun and calls `add_feature` / `add_text` / `fail`; `finish` closes the writers and writes
`import_summary.json` (raising JobFailed above the card's max_error_fraction).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray import storage
from mengzi_ray.features.oscar_import.common import ImportLog, KeySet, RowError, open_binary
from mengzi_ray.features.schema import FEATURES_SCHEMA, REGION_DIM
from mengzi_ray.text.tags import TagVocabulary

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
    attribute_lists: list[list[str]] = field(default_factory=list)
    attribute_scores: list[list[float]] = field(default_factory=list)


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
        "attribute_lists": pa.array([r.attribute_lists for r in records], pa.list_(pa.list_(pa.string()))),
        "attribute_scores": pa.array([r.attribute_scores for r in records], pa.list_(pa.list_(pa.float32()))),
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


STAGING = "_import_staging"
# what an import may write besides its logs: cleared before the new outputs are published
OUTPUT_NAMES = ("features/", "text.jsonl")


class ImportRun:
    """Outputs of one import under `card.output` (local or s3://), created lazily: a format that has no features
    writes no features/ dir, one without texts no text.jsonl."""

    def __init__(self, card: Any) -> None:
        self.card = card
        self.fs, root = storage.filesystem_for(card.output)
        self.final = root.rstrip("/")
        # outputs are written under a staging dir and replace the previous import's only in finish(), so a
        # re-import never mixes with stale parts and a crashed one leaves the previous outputs whole
        self.root = f"{self.final}/{STAGING}"
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)
        self.fs.create_dir(self.root, recursive=True)
        self.log = ImportLog(self.fs, self.final, card.format)
        self.tags = TagVocabulary.named(card.tags)
        self.image_ids = KeySet()
        self._features: FeatureWriter | None = None
        self._text: TextWriter | None = None
        self.files: list[str] = []

    def fail(self, table: str, file: str, line: int | None, error: RowError, image_id: str | None = None) -> None:
        self.log.fail(table, file, line, error, image_id)

    def add_feature(self, record: FeatureRecord, file: str, line: int | None) -> None:
        """Write one image's regions; a second row for an image id already written fails as duplicate_id."""
        if not self.image_ids.add(record.image_id):
            self.fail("features", file, line, RowError("duplicate_id", f"image {record.image_id!r} occurs again "
                                                       f"in {file}"), record.image_id)
            return
        if self._features is None:
            self._features = FeatureWriter(self.fs, self.root)
            self.files.append("features/")
        self._features.add(record)
        self.log.written["features"] += 1

    def has_features(self) -> bool:
        return self._features is not None

    def add_text(self, row: dict[str, Any]) -> None:
        if self._text is None:
            self._text = TextWriter(self.fs, self.root)
            self.files.append("text.jsonl")
        self._text.add(row)
        self.log.written["text"] += 1

    def copy_file(self, uri: str, name: str) -> None:
        """Copy a source file byte for byte to `<output>/<name>` (streamed)."""
        with open_binary(uri) as src, self.fs.open_output_stream(f"{self.root}/{name}") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)  # type: ignore[misc]
        self.files.append(name)

    def write_text_file(self, name: str, lines: Any) -> None:
        """Write `<output>/<name>` from an iterable of str lines (each gets a newline)."""
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            for line in lines:
                f.write((line + "\n").encode("utf-8"))
        self.files.append(name)

    def _publish(self) -> None:
        """Replace the previous import's outputs with the staged ones, file by file (S3 has no dir rename)."""
        for name in sorted(set(OUTPUT_NAMES) | set(self.files)):
            target = f"{self.final}/{name.rstrip('/')}"
            kind = self.fs.get_file_info(target).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(target)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(target)
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            if info.type == pafs.FileType.File:
                storage.publish_file(self.fs, info.path, f"{self.final}/{info.path[len(self.root) + 1:]}")
        self.fs.delete_dir(self.root)

    def finish(self, **extra: Any) -> dict[str, Any]:
        if self._features is not None:
            self._features.close()
        if self._text is not None:
            self._text.close()
        self.image_ids.close()
        self._publish()
        return self.log.finish(self.card.max_error_fraction,
                               {"output": self.card.output, "tags": self.card.tags, "files": self.files, **extra})
