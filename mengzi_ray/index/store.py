"""The embedding index on disk, and the inner products and top-k that exact search (index/search.py) is made of.

Layout (a local dir or s3:// prefix, by default `index/` beside the feature dataset's dir):

    part-*.parquet   image_id string, embedding fixed_size_list<float32, dim>: one row per indexed image
    index.json       {dim, model_dir, model_digest, images}: written last by every index run

Parts only ever appear whole (written under `_staging/`, then moved into place), so a crashed run leaves the parts
it finished and a re-run embeds only the images that are in no part (`indexed_ids`).
Readable without Ray by pyarrow, pandas or DuckDB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from mengzi_ray import storage

META_NAME = "index.json"
STAGING = "_staging"


def index_schema(dim: int) -> pa.Schema:
    return pa.schema([("image_id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def embedding_table(image_ids: list[str], vectors: np.ndarray) -> pa.Table:
    """(ids, (n, dim) float32) → a table of the index schema."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.Table.from_arrays([pa.array(image_ids, pa.string()), column], schema=index_schema(vectors.shape[1]))


def model_digest(model_dir: Path) -> str:
    """sha256 of a model dir's weights file: an index is only valid for the weights that made it."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = model_dir / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    raise FileNotFoundError(f"{model_dir}: no weights file to fingerprint")


def parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The .parquet files directly in `directory` (a path of `fs`), sorted; none when it does not exist."""
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def part_paths(uri: str) -> list[str]:
    """The committed part files of an index, sorted (none when the index does not exist yet)."""
    fs, root = storage.filesystem_for(uri)
    return parquet_files(fs, root.rstrip("/"))


def read_meta(uri: str) -> dict | None:
    """index.json of an index, or None when it has none yet."""
    import json

    fs, root = storage.filesystem_for(f"{uri.rstrip('/')}/{META_NAME}")
    if fs.get_file_info(root).type != pafs.FileType.File:
        return None
    return json.loads(storage.read_bytes(f"{uri.rstrip('/')}/{META_NAME}"))


def read_table(uri: str) -> pa.Table | None:
    """Every committed row of an index (None when it has no parts)."""
    paths = part_paths(uri)
    if not paths:
        return None
    fs, _ = storage.filesystem_for(uri)
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths])


def indexed_ids(uri: str) -> set[str]:
    """image_ids already in committed parts: what a re-run skips."""
    paths = part_paths(uri)
    fs, _ = storage.filesystem_for(uri)
    return {i for p in paths for i in pq.read_table(p, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist()}


@dataclass
class EmbeddingIndex:
    """An index's unit vectors (n, dim) float32 with their image ids (searched by index/search.py)."""

    image_ids: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.image_ids):
            raise ValueError(f"index vectors {self.vectors.shape} do not match {len(self.image_ids)} image ids")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("index holds an image_id twice")

    @classmethod
    def load(cls, uri: str) -> "EmbeddingIndex":
        """All committed parts of the index at `uri`, sorted by image_id. FileNotFoundError when it has none."""
        table = read_table(uri)
        if table is None:
            raise FileNotFoundError(f"{uri}: no index parts (run `mengzi-ray index` first)")
        table = table.sort_by("image_id")
        dim = table.schema.field("embedding").type.list_size
        vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, dim)
        return cls(table.column("image_id").to_pylist(), vectors.astype(np.float32, copy=False))


def inner_products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(Q, dim) × (n, dim) → (Q, n) float32 inner products, computed by torch on the CPU.

    Not numpy's `@`: numpy's OpenBLAS keeps a thread pool of its own whose threads spin for a while after each
    product, so on a machine with few cores the cross-encoder forward that follows a shortlist (Serve's two-stage
    search) ran at half speed beside them (bench/bench_retrieval_stages.py: 1.9× slower re-rank on 2 cores).
    torch's product runs on the same OpenMP team as the model."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    return (q @ v.T).numpy()


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of scores (Q, n): the k best columns, best first, ties by lower column; (indices, scores)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, scores.shape[1])
    # every column at least as good as the k-th best, so that ties are ordered by index, not by the partition
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    out = np.empty((len(scores), k), dtype=np.int64)
    for row in range(len(scores)):
        columns = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((columns, -scores[row, columns]))[:k]
        out[row] = columns[order]
    return out, np.take_along_axis(scores, out, axis=1)
