"""The index job: `mengzi-ray index --config jobs/index_tiny.yaml`.

Reads the feature dataset with Ray Data, drops the images the index already holds (resumable: a re-run embeds only
what is missing), embeds the rest on a fixed pool of `ImageEmbedActor`s (index/embedder.py: fixed-shape batches,
so a vector is bit-identical whatever the actor count), writes the new rows under `<index>/_staging/` and moves each
finished part into the index, then writes index.json. An index made by other weights is refused, never mixed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray import storage
from mengzi_ray.config import JobFailed
from mengzi_ray.features.schema import region_arrays
from mengzi_ray.index.card import IndexCard
from mengzi_ray.index.store import META_NAME, STAGING, indexed_ids, model_digest, parquet_files, read_meta
from mengzi_ray.text import tag_string
from mengzi_ray.text.tags import region_tags

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "features", "tags", "labels"]


class ImageEmbedActor:
    """Ray Data callable class: a pyarrow batch of feature rows → (image_id, embedding) rows."""

    def __init__(self, model_dir: str, batch_size: int, use_gpu: bool):
        from mengzi_ray.inference.embedder import DualEmbedder

        self.embedder = DualEmbedder(model_dir, batch_size=batch_size, device="cuda" if use_gpu else "cpu")
        self.tag_map = self.embedder.model.config.tag_map

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mengzi_ray.index.store import embedding_table

        images = [
            (tag_string(region_tags(labels, tags, self.tag_map)), feats)
            for feats, tags, labels in zip(region_arrays(batch.column("features")), batch.column("tags").to_pylist(),
                                           batch.column("labels").to_pylist())
        ]
        return embedding_table(batch.column("image_id").to_pylist(), self.embedder.embed_images(images))


def _skip_done(batch: pa.Table, done: list[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("image_id"), value_set=pa.array(done, pa.string()))))


def run_index(card: IndexCard) -> dict[str, Any]:
    """Embed the dataset's images not yet in the index. Returns (and writes into index.json) {output, dim, images
    (rows now in the index), embedded (this run), skipped (already indexed), seconds}. ConfigError-like
    JobFailed when the index was built by other weights or the model has no dual encoder."""
    from mengzi_ray.modeling import OscarConfig
    from mengzi_ray.ray_runtime import ensure_ray

    model_dir = storage.download_dir(card.model_dir)
    config = OscarConfig.load(model_dir)
    if not config.dual_encoder_dim:
        raise JobFailed(f"{card.model_dir}: no dual encoder in the model dir (config.json dual_encoder_dim is 0)")
    digest = model_digest(model_dir)
    out = card.output_uri()
    meta = read_meta(out)
    if meta is not None and meta.get("model_digest") != digest:
        raise JobFailed(f"{out}: index was built by other weights ({meta.get('model_dir')}); delete it or choose "
                        "another output")
    fs, root = storage.filesystem_for(out)
    root = root.rstrip("/")
    staging = f"{root}/{STAGING}"
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)  # an unfinished run's rows: not in the index, redone below
    start = time.perf_counter()
    done = indexed_ids(out)
    fs_in, features = storage.filesystem_for(card.features)
    wanted = pq.read_table(features, filesystem=fs_in, columns=["image_id"]).column("image_id").to_pylist()
    wanted = wanted[: card.max_images] if card.max_images is not None else wanted
    missing = sum(1 for image_id in wanted if image_id not in done)
    new_rows = 0
    if missing:
        ensure_ray(card.ray)
        new_rows = _embed_missing(card, str(model_dir), sorted(done), f"{staging}/{uuid.uuid4().hex[:8]}", fs, root)
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)
    images = len(indexed_ids(out))
    summary = {"output": out, "dim": config.dual_encoder_dim, "images": images, "embedded": new_rows,
               "skipped": len(wanted) - new_rows, "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(f"{out}/{META_NAME}", {**summary, "model_dir": card.model_dir, "model_digest": digest})
    log.info("index %s: %d embedded, %d skipped, %d images", out, new_rows, len(wanted) - new_rows, images)
    return summary


def _embed_missing(card: IndexCard, model_dir: str, done: list[str], run_dir: str, fs: pafs.FileSystem, root: str,
                   actor_cls: type = ImageEmbedActor) -> int:
    """Embed the (first max_images) dataset rows not in `done` on the actor pool, stage them under `run_dir` and move
    the finished parts into the index dir `root`; returns the number of rows embedded."""
    import ray.data

    a = card.actors
    fs_in, features = storage.filesystem_for(card.features)
    data = ray.data.read_parquet(features, filesystem=fs_in).select_columns(COLUMNS)
    if card.max_images is not None:
        data = data.limit(card.max_images)
    # blocks of rows_per_block so that every actor of the pool gets work
    todo = data.map_batches(_skip_done, fn_kwargs={"done": done}, batch_format="pyarrow").materialize()
    todo = todo.repartition(max(1, math.ceil(todo.count() / a.rows_per_block)))
    embedded = todo.map_batches(
        actor_cls,
        fn_constructor_kwargs={"model_dir": model_dir, "batch_size": a.batch_size, "use_gpu": a.num_gpus > 0},
        compute=ray.data.ActorPoolStrategy(min_size=a.num_actors, max_size=a.num_actors),
        num_cpus=a.num_cpus, num_gpus=a.num_gpus or None, batch_size=a.rows_per_block, batch_format="pyarrow",
    ).materialize()
    new_rows = embedded.count()
    if new_rows:
        embedded.write_parquet(run_dir, filesystem=fs)
        for path in parquet_files(fs, run_dir):
            storage.publish_file(fs, path, f"{root}/{path.rsplit('/', 1)[-1]}")
    return new_rows
