"""Examples at scale: feature rows ⨝ text rows on image_id with Ray Data, decoded to numpy in the workers.

The join is a broadcast hash join: the text side (a few short strings per image, ~100 bytes a row: 3.7M rows of
the Mengzi corpus is ~0.4 GB of Arrow) is read once on the driver into one Arrow table and put in the object
store, where every map task reads it zero-copy; the feature side (≈400 KB an image) streams from Parquet block by
block and is never shuffled or held whole. The join holds no tokens, so one joined dataset feeds every layout; a
task that builds its examples upstream (`Task.upstream`, training/tasks.py) adds a map stage after it
(`prepare_caption_batch` for captioning: tokens, segments, padded regions and lengths as fixed-shape columns;
`prepare_retrieval_batch` for retrieval: each row's text and image sides; `prepare_pretrain_batch` for pretraining:
each row's own text_a and text_b tokens and padded regions), so tokenisation overlaps training and workers receive
ready arrays; SCST tensorises joined rows in the worker.

Driver-side checks (`check_data`) find missing datasets, wrong feature dims and orphan texts before any worker
starts; they read only Parquet schemas and the image_id column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.data.dual_encoder import DualEncoderTensorizer
from mengzi_ray.data.pretraining import PretrainTensorizer
from mengzi_ray.data.records import ImageRecord, read_text_rows
from mengzi_ray.features.layout import features_dim, region_arrays_of
from mengzi_ray.text import tag_string
from mengzi_ray.training.dual_objective import KEY, image_keys

FEATURE_COLUMNS = ["image_id", "features", "tags"]


def read_text_table(uri: str, split: str, kind: str) -> pa.Table:
    """Text rows of one split and kind (`all`: every kind) as an Arrow table (image_id string, text[, text_b]), in
    file order, read by data.records.read_text_rows (Arrow's JSON reader would type integer image_ids as int64,
    which then match no feature row); text_b is kept when the rows have it (an imported Oscar+ corpus)."""
    chosen = [r for r in read_text_rows(uri) if r["split"] == split and (kind == "all" or r["kind"] == kind)]
    columns = {
        "image_id": pa.array([r["image_id"] for r in chosen], pa.string()),
        "text": pa.array([str(r["text"]) for r in chosen], pa.string()),
    }
    if any("text_b" in r for r in chosen):
        columns["text_b"] = pa.array([r.get("text_b") for r in chosen], pa.string())
    return pa.table(columns)


def feature_dim(uri: str) -> int:
    """D of the `features` column (either layout, features.layout) from the Parquet schema alone."""
    fs, path = storage.filesystem_for(uri)
    try:
        return features_dim(pq.ParquetDataset(path, filesystem=fs).schema)
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from None


def feature_image_ids(uri: str) -> set[str]:
    fs, path = storage.filesystem_for(uri)
    return set(pq.ParquetDataset(path, filesystem=fs).read(columns=["image_id"]).column("image_id").to_pylist())


def check_data(features: str, text: str, splits: dict[str, str], kind: str, img_feature_dim: int) -> dict[str, int]:
    """Raise ConfigError naming the card field when an input is missing or does not fit; returns text counts.

    `splits` maps the card field (data.train_split / data.val_split) to the split name."""
    for field, uri in (("data.features", features), ("data.text", text)):
        fs, path = storage.filesystem_for(uri)
        if fs.get_file_info(path).type.name == "NotFound":
            raise ConfigError(f"{field}: {uri} does not exist")
    try:
        dim = feature_dim(features)
    except (ValueError, OSError) as e:
        raise ConfigError(f"data.features: {e}") from None
    if dim != img_feature_dim:
        raise ConfigError(f"data.features: regions are {dim}-d but model.img_feature_dim is {img_feature_dim}")
    ids = feature_image_ids(features)
    counts = {}
    for field, split in splits.items():
        table = read_text_table(text, split, kind)
        if table.num_rows == 0:
            raise ConfigError(f"{field}: no {kind} rows of split {split!r} in {text}")
        orphans = set(table.column("image_id").to_pylist()) - ids
        if orphans:
            raise ConfigError(f"{field}: {len(orphans)} {split} texts name images without features, e.g. {sorted(orphans)[:3]}")
        counts[split] = table.num_rows
    return counts


def _attach_texts(block: pa.Table, texts: pa.Table, per_image: bool) -> pa.Table:
    """Inner join of a feature block with the broadcast text table (see module docstring)."""
    ids = block.column("image_id")
    hits = texts.filter(pc.is_in(texts["image_id"], value_set=ids))
    with_b = "text_b" in texts.column_names
    if per_image:
        aggregates = [("text", "list")] + ([("text_b", "list")] if with_b else [])
        grouped = hits.group_by("image_id", use_threads=False).aggregate(aggregates)
        rows = pc.index_in(grouped["image_id"], value_set=ids)
        out = block.take(rows).append_column("texts", grouped["text_list"])
        return out.append_column("texts_b", grouped["text_b_list"]) if with_b else out
    rows = pc.index_in(hits["image_id"], value_set=ids)
    out = block.take(rows).append_column("text", hits["text"])
    return out.append_column("text_b", hits["text_b"]) if with_b else out


def _attach_broadcast_texts(block: pa.Table, texts_ref: Any, per_image: bool) -> pa.Table:
    """Map-task side of the join: fetch the broadcast text table (zero-copy from the object store)."""
    import ray

    return _attach_texts(block, ray.get(texts_ref), per_image)


def joined_dataset(features: str, texts: pa.Table, *, per_image: bool = False, limit: int | None = None) -> Any:
    """Ray Dataset of feature rows ⨝ `texts`: one row per text (column `text`) or, with `per_image`, one row per
    image with all its texts (column `texts`). `limit` keeps the first N rows (validation galleries)."""
    import ray

    fs, path = storage.filesystem_for(features)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=FEATURE_COLUMNS)
    if limit is not None:
        ids = pc.unique(texts["image_id"])[:limit]
        texts = texts.filter(pc.is_in(texts["image_id"], value_set=ids))
    texts_ref = ray.put(texts)
    ds = ds.map_batches(
        _attach_broadcast_texts, batch_format="pyarrow", fn_kwargs={"texts_ref": texts_ref, "per_image": per_image}, zero_copy_batch=True
    )
    return ds.limit(limit) if limit is not None else ds


def to_records(batch: pa.Table | dict[str, Any]) -> list[ImageRecord]:
    """A joined batch (Arrow, from `iter_batches(batch_format="pyarrow")`) → ImageRecords with (N, D) float32
    regions; `texts` holds the row's one text, or all texts of the image for per-image datasets."""
    table = batch if isinstance(batch, pa.Table) else pa.table(batch)
    regions = region_arrays_of(table)
    text_col = "texts" if "texts" in table.column_names else "text"
    texts = table.column(text_col).to_pylist()
    b_col = "texts_b" if text_col == "texts" else "text_b"
    texts_b = table.column(b_col).to_pylist() if b_col in table.column_names else [None] * table.num_rows
    return [
        ImageRecord(
            image_id=image_id,
            texts=t if isinstance(t, list) else [t],
            features=regions[i],
            od_labels=tag_string(tags or []),
            texts_b=None if b is None else (b if isinstance(b, list) else [b]),
        )
        for i, (image_id, t, tags, b) in enumerate(
            zip(table.column("image_id").to_pylist(), texts, table.column("tags").to_pylist(), texts_b)
        )
    ]


def prepare_caption_batch(batch: pa.Table, tensorizer: CaptionTensorizer) -> dict[str, np.ndarray]:
    """Ray Data map stage of caption training (jobs.build_trainer): a joined batch (one text per row) → the
    deterministic half of its train examples (`CaptionTensorizer.prepare_batch`: input_ids, token_type_ids,
    img_feats, seq_a_len, seq_len, num_regions) plus `image_id` and `text` string columns (fault_drill.log_ids).
    The training worker masks them per step (`CaptionTensorizer.mask_batch`)."""
    records = to_records(batch)
    prepared = tensorizer.prepare_batch([r.texts[0] for r in records], [r.od_labels for r in records], [r.features for r in records])
    return _with_ids(prepared, records)


def prepare_retrieval_batch(batch: pa.Table, tensorizer: DualEncoderTensorizer) -> dict[str, np.ndarray]:
    """Ray Data map stage of retrieval training: a joined batch (one text per row) → each row's text side and image
    side (`DualEncoderTensorizer.sides_batch`: data.dual_encoder.SIDE_COLUMNS), its image key
    (training.dual_objective.KEY) and the `image_id` and `text` columns. The training worker draws the negatives
    and composes the cross-encoder's pairs from the sides (`RetrievalTask.step_batch`)."""
    records = to_records(batch)
    prepared = tensorizer.sides_batch([r.texts[0] for r in records], [r.od_labels for r in records], [r.features for r in records])
    prepared[KEY] = image_keys([r.image_id for r in records])
    return _with_ids(prepared, records)


def prepare_pretrain_batch(batch: pa.Table, tensorizer: PretrainTensorizer) -> dict[str, np.ndarray]:
    """Ray Data map stage of pretraining: a joined batch (one text per row) → each row's own text_a and text_b
    tokenised and its regions padded (`PretrainTensorizer.prepare_batch`: data.pretraining.PREPARED_KEYS) and the
    `image_id` and `text` columns. The training worker pollutes, lays out and masks the pairs
    (`PretrainTask.step_batch`)."""
    records = to_records(batch)
    prepared = tensorizer.prepare_batch([r.texts[0] for r in records], [r.text_b(0) for r in records], [r.features for r in records])
    return _with_ids(prepared, records)


def _with_ids(prepared: dict[str, np.ndarray], records: list[ImageRecord]) -> dict[str, np.ndarray]:
    prepared["image_id"] = np.array([r.image_id for r in records], dtype=str)
    prepared["text"] = np.array([r.texts[0] for r in records], dtype=str)
    return prepared
