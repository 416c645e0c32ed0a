"""Oscar/VinVL TSV export (`mengzi-ray export-oscar`) and the VinVL region encoding; the importers of every original
layout are in features/oscar_import/.

Layouts written (and read back by `import-oscar` formats vinvl/caption):
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
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.features.card import ExportOscarCard
from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray.features.schema import REGION_DIM



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
        # the schema from the dataset, not the batch: it carries the packed layout's metadata
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=dataset.schema)
        others = batch.drop_columns(["features"]).to_pylist()
        for row, vectors in zip(others, region_arrays_of(batch)):
            if row["image_id"] in index:
                raise ConfigError(f"dataset {card.dataset}: image_id {row['image_id']!r} occurs twice")
            index[row["image_id"]] = len(index)
            feats.write(row["image_id"], str(len(vectors)), encode_regions(vectors))
            preds.write(row["image_id"], json.dumps(prediction_json(row), ensure_ascii=False))
    feats.close()
    preds.close()
    with fs.open_output_stream(f"{root}/imageid2idx.json") as f:
        f.write(json.dumps(index, ensure_ascii=False).encode("utf-8"))
    return {"images": len(index), "output": card.output}
