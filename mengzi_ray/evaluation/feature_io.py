"""Reading a region-feature dataset (docs/data-contracts.md, a Parquet file or dir, local or s3://) for evaluation.

The driver reads only the ``image_id`` column to plan (:func:`feature_ids`); small galleries (retrieval: ≤ 5k
images) are loaded whole (:func:`load_regions`); caption inference streams the dataset through Ray Data
(:func:`read_feature_dataset`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray.storage import filesystem_for
from mengzi_ray.text import tag_string
from mengzi_ray.text.tags import region_tags

EVAL_COLUMNS = ["image_id", "features", "tags", "labels", "source"]


def od_label_string(labels: list[str] | None, tags: list[str], tag_map: str | None) -> str:
    """The od-label string a model is fed (text.tags.region_tags joined): a released checkpoint sees the tags of
    the map it was trained with (langboat), translated from the stored English labels."""
    return tag_string(region_tags(labels, tags, tag_map))


def feature_ids(uri: str) -> list[str]:
    """Every image_id of the dataset, in storage order. FileNotFoundError when nothing is at ``uri``."""
    fs, path = filesystem_for(uri)
    try:
        table = pq.read_table(path, columns=["image_id"], filesystem=fs)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{uri}: cannot read a feature dataset ({exc})") from None
    return table.column("image_id").to_pylist()


def load_regions(uri: str, image_ids: list[str], tag_map: str | None = None) -> dict[str, tuple[np.ndarray, str, str]]:
    """image_id → (regions (N, 2054) float32, od-label string, source URI) for the given ids; the od labels through
    `tag_map` (see od_label_string)."""
    fs, path = filesystem_for(uri)
    table = pq.read_table(path, columns=EVAL_COLUMNS, filesystem=fs, filters=pc.field("image_id").isin(image_ids))
    columns = zip(
        table.column("image_id").to_pylist(),
        region_arrays_of(table),
        table.column("tags").to_pylist(),
        table.column("labels").to_pylist(),
        table.column("source").to_pylist(),
    )
    return {image_id: (regions, od_label_string(labels, tags, tag_map), source)
            for image_id, regions, tags, labels, source in columns}


def read_feature_dataset(uri: str, image_ids: list[str]) -> Any:
    """A Ray Dataset of the given images' rows (EVAL_COLUMNS), filtered with an Arrow predicate expression."""
    import ray.data
    from ray.data.expressions import col

    fs, path = filesystem_for(uri)
    dataset = ray.data.read_parquet(path, filesystem=fs, columns=EVAL_COLUMNS)
    return dataset.filter(expr=col("image_id").is_in(image_ids))
