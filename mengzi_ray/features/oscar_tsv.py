"""Oscar/VinVL TSV interop (oscar-formats.md §1.1-1.5): `mengzi-ray import-oscar` and `mengzi-ray export-oscar`.

Layouts read and written:
- VinVL `features.tsv`: `key \\t num_boxes \\t base64(float32[num_boxes * D])` (D = 2054, or 2048 without geometry);
- caption `feature.tsv`: `key \\t {"num_boxes": N, "features": base64(float32[N * D])}`;
- `predictions.tsv` / label tsv: `key \\t {"image_h", "image_w", "objects": [{"rect", "class", "conf", ...}]}` or
  `key \\t [objects]` (then the size defaults to Oscar's 600x800);
- `imageid2idx.json` {key: row} and a `.lineidx` (byte offset of every line) next to every tsv we write.

Round trip: export writes each region's 2054-d vector bit for bit, and our own columns the VinVL layout has no
place for (tags, source, detector, attributes) as extra json keys that Oscar's readers ignore; import reads them
back, so dataset → TSV → dataset is lossless. Both jobs stream in the driver process (no Ray needed).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.features.card import ExportOscarCard, ImportOscarCard
from mengzi_ray.features.schema import APPEARANCE_DIM, FEATURES_SCHEMA, REGION_DIM, box_geometry
from mengzi_ray.text.tags import TagVocabulary

OSCAR_DEFAULT_HW = (600, 800)  # Oscar's run_retrieval default when a label row has no image_h/image_w
ROWS_PER_FILE = 2000


def encode_regions(vectors: np.ndarray) -> str:
    """(N, D) float → base64 of little-endian float32, row-major (the VinVL encoding)."""
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_regions(text: str, num_boxes: int) -> np.ndarray:
    """Inverse of encode_regions → (num_boxes, D) float32."""
    flat = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if num_boxes == 0:
        return flat.reshape(0, REGION_DIM).astype(np.float32)
    if flat.size % num_boxes:
        raise ValueError(f"{flat.size} floats do not split into {num_boxes} boxes")
    return flat.reshape(num_boxes, -1).astype(np.float32)


def _tsv_rows(uri: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-split stripped columns) of every non-empty line of a tsv (local or s3://)."""
    fs, path = storage.filesystem_for(uri)
    try:
        stream = fs.open_input_stream(path)
    except FileNotFoundError:
        raise ConfigError(f"{uri}: file not found") from None
    with stream, io.TextIOWrapper(stream, encoding="utf-8") as text:
        for number, line in enumerate(text, start=1):
            if line.strip():
                yield number, [col.strip() for col in line.rstrip("\n").split("\t")]


class TsvWriter:
    """Writes `name.tsv` and its `name.lineidx` (byte offset of each line) under a dir (local or s3://)."""

    def __init__(self, fs: pafs.FileSystem, directory: str, name: str) -> None:
        self.fs, self.dir, self.name = fs, directory, name
        self.stream = fs.open_output_stream(f"{directory}/{name}.tsv")
        self.offsets: list[int] = []
        self.position = 0

    def write(self, *columns: str) -> None:
        line = ("\t".join(columns) + "\n").encode("utf-8")
        self.offsets.append(self.position)
        self.stream.write(line)
        self.position += len(line)

    def close(self) -> None:
        self.stream.close()
        with self.fs.open_output_stream(f"{self.dir}/{self.name}.lineidx") as f:
            f.write("".join(f"{o}\n" for o in self.offsets).encode("ascii"))


def _labels_by_key(uri: str) -> dict[str, Any]:
    out = {}
    for number, cols in _tsv_rows(uri):
        if len(cols) < 2:
            raise ConfigError(f"{uri} line {number}: expected key<TAB>json")
        try:
            out[cols[0]] = json.loads(cols[-1])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{uri} line {number}: label json does not parse: {exc}") from None
    return out


def _feature_rows(card: ImportOscarCard) -> Iterator[tuple[str, np.ndarray]]:
    for number, cols in _tsv_rows(card.features):
        where = f"{card.features} line {number}"
        try:
            if card.format == "vinvl":
                if len(cols) != 3:
                    raise ValueError(f"expected 3 columns (key, num_boxes, base64), got {len(cols)}")
                yield cols[0], decode_regions(cols[2], int(cols[1]))
            else:
                record = json.loads(cols[-1])
                yield cols[0], decode_regions(record["features"], int(record["num_boxes"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def imported_row(key: str, vectors: np.ndarray, label: Any, features_uri: str, detector: str) -> dict[str, Any]:
    """One FEATURES_SCHEMA row from a feature-tsv row and its label json (dict with objects, or a bare list)."""
    objects = label.get("objects", []) if isinstance(label, dict) else label
    meta = label if isinstance(label, dict) else {}
    height, width = int(meta.get("image_h", OSCAR_DEFAULT_HW[0])), int(meta.get("image_w", OSCAR_DEFAULT_HW[1]))
    if len(objects) != len(vectors):
        raise ValueError(f"{len(vectors)} feature rows but {len(objects)} label objects")
    if vectors.shape[1] == APPEARANCE_DIM:
        boxes = np.asarray([o["rect"] for o in objects], np.float32).reshape(-1, 4)
        vectors = np.concatenate([vectors, box_geometry(boxes, width, height)], axis=1)
    elif vectors.shape[1] != REGION_DIM:
        raise ValueError(f"region vectors have {vectors.shape[1]} dims, expected {APPEARANCE_DIM} or {REGION_DIM}")
    if all("rect" in o for o in objects):
        boxes = np.asarray([o["rect"] for o in objects], np.float32).reshape(-1, 4)
    else:  # the geometry part holds x1/W, y1/H, x2/W, y2/H
        boxes = vectors[:, APPEARANCE_DIM : APPEARANCE_DIM + 4] * np.float32([width, height, width, height])
    labels = [str(o["class"]) for o in objects]
    tags = meta.get("tags") or (TagVocabulary.default().translate(labels).tags if labels else [])
    # scene_graph_benchmark writes `attributes` + `attr_scores` lists per object when asked; ours carry the top one
    has_lists = bool(objects) and all("attr_scores" in o for o in objects)
    attribute_lists = [[str(a) for a in o.get("attributes", [])] for o in objects] if has_lists else []
    if has_lists:
        attributes = [names[0] if names else "" for names in attribute_lists]
    else:
        attributes = [o["attributes"][0] for o in objects if o.get("attributes")]
    return {
        "image_id": key,
        "source": meta.get("source", f"{features_uri}#{key}"),
        "width": width,
        "height": height,
        "boxes": boxes.tolist(),
        "features": vectors.tolist(),
        "scores": [float(o.get("conf", 1.0)) for o in objects],
        "labels": labels,
        "tags": list(tags),
        "attributes": attributes if len(attributes) == len(objects) else [],
        "detector": meta.get("detector", detector),
        "attribute_lists": attribute_lists,
        "attribute_scores": [[float(v) for v in o["attr_scores"]] for o in objects] if has_lists else [],
    }


def run_import(card: ImportOscarCard) -> dict[str, Any]:
    """Oscar/VinVL TSV → <output>/features/part-NNNNN.parquet. Returns and writes <output>/import_summary.json."""
    labels = _labels_by_key(card.labels)
    fs, root = storage.filesystem_for(card.output)
    root = root.rstrip("/")
    fs.create_dir(f"{root}/features", recursive=True)
    rows: list[dict[str, Any]] = []
    written, files = 0, 0

    def flush() -> None:
        nonlocal files, written, rows
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA),
                           f"{root}/features/part-{files:05d}.parquet", filesystem=fs)
            files, written, rows = files + 1, written + len(rows), []

    for key, vectors in _feature_rows(card):
        if key not in labels:
            raise ConfigError(f"{card.features}: image {key!r} has no row in {card.labels}")
        try:
            rows.append(imported_row(key, vectors, labels[key], card.features, card.detector))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{card.features}: image {key!r}: {exc}") from None
        if len(rows) >= ROWS_PER_FILE:
            flush()
    flush()
    summary = {"images": written, "files": files, "output": card.output}
    with fs.open_output_stream(f"{root}/import_summary.json") as f:
        f.write(json.dumps(summary).encode("utf-8"))
    return summary


def prediction_json(row: dict[str, Any]) -> dict[str, Any]:
    """A feature row → the predictions.tsv json (VinVL keys + our extra keys for a lossless round trip)."""
    objects = []
    for i, (rect, label, score) in enumerate(zip(row["boxes"], row["labels"], row["scores"])):
        obj = {"rect": [float(v) for v in rect], "bbox_id": i, "class": label, "conf": float(score)}
        if row.get("attribute_lists"):
            obj["attributes"] = list(row["attribute_lists"][i])
            obj["attr_scores"] = [float(v) for v in row["attribute_scores"][i]]
        elif row["attributes"]:
            obj["attributes"] = [row["attributes"][i]]
        objects.append(obj)
    return {"image_h": row["height"], "image_w": row["width"], "objects": objects, "tags": row["tags"],
            "source": row["source"], "detector": row["detector"]}


def run_export(card: ExportOscarCard) -> dict[str, Any]:
    """<dataset>/features → <output>/{features.tsv, predictions.tsv, imageid2idx.json} + .lineidx files."""
    src_fs, src = storage.filesystem_for(card.dataset)
    features_dir = f"{src.rstrip('/')}/features"
    if src_fs.get_file_info(features_dir).type != pafs.FileType.Directory:
        raise ConfigError(f"dataset {card.dataset}: no features/ directory")
    fs, root = storage.filesystem_for(card.output)
    root = root.rstrip("/")
    fs.create_dir(root, recursive=True)
    feats, preds = TsvWriter(fs, root, "features"), TsvWriter(fs, root, "predictions")
    index: dict[str, int] = {}
    dataset = pads.dataset(features_dir, filesystem=src_fs, format="parquet")
    for batch in dataset.to_batches(batch_size=256):
        for row in batch.to_pylist():
            if row["image_id"] in index:
                raise ConfigError(f"dataset {card.dataset}: image_id {row['image_id']!r} occurs twice")
            index[row["image_id"]] = len(index)
            vectors = np.asarray(row["features"], np.float32).reshape(-1, REGION_DIM)
            feats.write(row["image_id"], str(len(vectors)), encode_regions(vectors))
            preds.write(row["image_id"], json.dumps(prediction_json(row), ensure_ascii=False))
    feats.close()
    preds.close()
    with fs.open_output_stream(f"{root}/imageid2idx.json") as f:
        f.write(json.dumps(index, ensure_ascii=False).encode("utf-8"))
    return {"images": len(index), "output": card.output}
