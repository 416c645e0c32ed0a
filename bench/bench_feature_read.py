"""Feature read throughput: our Parquet (Arrow → numpy views) vs the Oscar TSV base64 reader, same 5,000 rows.

Both sides produce, for every row, the image key and an (N, 2054) float32 matrix, reading the whole file from
the local disk (page cache warm after the first repeat; both alike). Baseline: Oscar's TSVFile reading, i.e. split
each line on tabs, base64-decode the last column, np.frombuffer → reshape (num_boxes, 2054). Ours: pyarrow.parquet
iter_batches + features.schema.region_arrays. Also shown: the per-cell Python-list path (`to_pylist` +
region_matrix) that data/records.py uses today.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import git_commit, median, print_table, write_results

from mengzi_ray.features.oscar_tsv import encode_regions
from mengzi_ray.features.schema import FEATURES_SCHEMA, REGION_DIM, region_arrays, region_matrix

SCRIPT = "bench_feature_read"
ROWS = 5000
REGIONS = 10  # per row, as the tiny extraction card keeps (VinVL keeps 50 for training: 5x the bytes per row)
REPEATS = 3
SEED = 0


def write_both(directory: Path) -> tuple[Path, Path]:
    """The same ROWS random rows as our Parquet and as a VinVL features.tsv."""
    rng = np.random.default_rng(SEED)
    parquet, tsv = directory / "features.parquet", directory / "features.tsv"
    writer = pq.ParquetWriter(parquet, FEATURES_SCHEMA)
    with open(tsv, "w", encoding="ascii") as out:
        for start in range(0, ROWS, 500):
            rows = []
            for i in range(start, start + 500):
                vectors = rng.random((REGIONS, REGION_DIM), dtype=np.float32)
                out.write(f"img{i}\t{REGIONS}\t{encode_regions(vectors)}\n")
                rows.append({"image_id": f"img{i}", "source": f"s3://b/img{i}.jpg", "width": 640, "height": 480,
                             "boxes": [[0, 0, 1, 1]] * REGIONS, "features": vectors, "scores": [1.0] * REGIONS,
                             "labels": ["dog"] * REGIONS, "tags": ["狗"] * REGIONS, "attributes": [],
                             "detector": "bench"})
            writer.write_table(pa.Table.from_pylist(
                [{**r, "features": list(r["features"])} for r in rows], schema=FEATURES_SCHEMA))
    writer.close()
    return parquet, tsv


def read_tsv(path: Path) -> int:
    count = 0
    with open(path, encoding="ascii") as f:
        for line in f:
            key, num_boxes, data = line.rstrip("\n").split("\t")
            matrix = np.frombuffer(base64.b64decode(data), dtype=np.float32).reshape(int(num_boxes), -1)
            count += matrix.shape[0] == REGIONS
    return count


def read_parquet_arrow(path: Path) -> int:
    count = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=["image_id", "features"]):
        keys = batch.column(0).to_pylist()
        for key, matrix in zip(keys, region_arrays(batch.column(1))):
            count += matrix.shape[0] == REGIONS
    return count


def read_parquet_pylist(path: Path) -> int:
    count = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=["image_id", "features"]):
        for key, cell in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            count += region_matrix(cell).shape[0] == REGIONS
    return count


def main() -> None:
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        parquet, tsv = write_both(Path(tmp))
        sizes = {"parquet_MB": round(parquet.stat().st_size / 1e6, 1), "tsv_MB": round(tsv.stat().st_size / 1e6, 1)}
        readers = {"oscar_tsv_base64": read_tsv, "parquet_arrow": read_parquet_arrow,
                   "parquet_pylist": read_parquet_pylist}
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(REPEATS):
            for name, reader in readers.items():
                start = time.perf_counter()
                assert reader(parquet if name.startswith("parquet") else tsv) == ROWS
                times[name].append(time.perf_counter() - start)
    base = ROWS / median(times["oscar_tsv_base64"])
    results = {name: {"rows_per_s": round(ROWS / median(t), 1), "seconds": [round(x, 3) for x in t],
                      "ratio_vs_tsv": round(ROWS / median(t) / base, 2)} for name, t in times.items()}
    print_table(["reader", "rows/s", "ratio vs Oscar TSV"],
                [[n, r["rows_per_s"], r["ratio_vs_tsv"]] for n, r in results.items()])
    print(f"files: {sizes}")
    settings = {"rows": ROWS, "regions_per_row": REGIONS, "repeats": REPEATS, **sizes}
    print(write_results(SCRIPT, torch.device("cpu"), commit, settings, results))


if __name__ == "__main__":
    main()
