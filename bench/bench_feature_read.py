"""Feature read throughput: our Parquet layouts vs the Oscar TSV base64 reader, same 5,000 rows.

Every reader produces, for every row, the image key and an (N, 2054) float32 matrix, reading the whole file from
the local disk (page cache warm after the first repeat; all alike). Baseline: Oscar's TSVFile reading, i.e. split
each line on tabs, base64-decode the last column, np.frombuffer → reshape (num_boxes, 2054). Ours: pyarrow.parquet
iter_batches (image_id and features only: column projection) through the memory-mapped local filesystem of
storage.filesystem_for + features.layout.region_arrays_of, for the nested layout (list<fixed_size_list<float32>>),
the packed float32 layout and packed float16 (lossy, upcast on read).
Also shown: the per-cell Python-list path (`to_pylist` + region_matrix), and two physical references over the same
float32 bytes as one raw file: `np.fromfile` (one array for the whole file) and `readinto` 512 rows at a time into
a reused buffer; MB/s counts the float32 bytes every reader hands out.
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

from mengzi_ray.features.layout import LAYOUTS, region_arrays_of, to_layout, write_features
from mengzi_ray.features.oscar_tsv import encode_regions
from mengzi_ray.features.schema import FEATURES_SCHEMA, REGION_DIM, region_matrix
from mengzi_ray.storage import filesystem_for

SCRIPT = "bench_feature_read"
ROWS = 5000
REGIONS = 10  # per row, as the tiny extraction card keeps (VinVL keeps 50 for training: 5x the bytes per row)
REPEATS = 3
SEED = 0


def write_all(directory: Path) -> dict[str, Path]:
    """The same ROWS random rows as a VinVL features.tsv, our Parquet in every layout, and the raw float32 bytes."""
    rng = np.random.default_rng(SEED)
    paths = {"tsv": directory / "features.tsv", "raw": directory / "features.f32"}
    parts: list[pa.Table] = []
    with open(paths["tsv"], "w", encoding="ascii") as out, open(paths["raw"], "wb") as raw:
        for start in range(0, ROWS, 500):
            rows = []
            for i in range(start, start + 500):
                vectors = rng.random((REGIONS, REGION_DIM), dtype=np.float32)
                out.write(f"img{i}\t{REGIONS}\t{encode_regions(vectors)}\n")
                raw.write(vectors.tobytes())
                rows.append({"image_id": f"img{i}", "source": f"s3://b/img{i}.jpg", "width": 640, "height": 480,
                             "boxes": [[0, 0, 1, 1]] * REGIONS, "features": list(vectors), "scores": [1.0] * REGIONS,
                             "labels": ["dog"] * REGIONS, "tags": ["狗"] * REGIONS, "attributes": [],
                             "detector": "bench"})
            parts.append(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA))
    table = pa.concat_tables(parts)
    for layout in LAYOUTS:
        paths[layout] = directory / f"features.{layout}.parquet"
        write_features(to_layout(table, layout), str(paths[layout]))
    return paths


def read_tsv(path: Path) -> int:
    count = 0
    with open(path, encoding="ascii") as f:
        for line in f:
            key, num_boxes, data = line.rstrip("\n").split("\t")
            matrix = np.frombuffer(base64.b64decode(data), dtype=np.float32).reshape(int(num_boxes), -1)
            count += matrix.shape[0] == REGIONS
    return count


def read_parquet_arrow(path: Path) -> int:
    """Our reader: the filesystem `storage.filesystem_for` gives every reader of a local dataset (memory-mapped)."""
    count = 0
    fs, where = filesystem_for(str(path))
    parquet = pq.ParquetFile(where, filesystem=fs)
    for batch in parquet.iter_batches(batch_size=512, columns=["image_id", "features"]):
        keys = batch.column(0).to_pylist()
        for key, matrix in zip(keys, region_arrays_of(batch)):
            count += matrix.shape[0] == REGIONS
    return count


def read_raw(path: Path) -> int:
    """The physical reference: the same float32 bytes in one file, one np.fromfile."""
    return np.fromfile(path, dtype=np.float32).reshape(-1, REGIONS, REGION_DIM).shape[0]


def read_raw_chunks(path: Path) -> int:
    """A second physical reference: the same bytes read 512 rows at a time into one reused buffer (no fresh
    allocation per read; np.fromfile's one 400 MB array pays a page fault per 4 KiB, which dominates in a VM)."""
    row_bytes = REGIONS * REGION_DIM * 4
    buffer = bytearray(512 * row_bytes)
    count = 0
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            count += len(np.frombuffer(buffer, dtype=np.float32, count=size // 4).reshape(-1, REGIONS, REGION_DIM))
    return count


def read_parquet_pylist(path: Path) -> int:
    count = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=["image_id", "features"]):
        for key, cell in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            count += region_matrix(cell).shape[0] == REGIONS
    return count


def main() -> None:
    commit = git_commit()
    float_mb = ROWS * REGIONS * REGION_DIM * 4 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_all(Path(tmp))
        sizes = {f"{name}_MB": round(path.stat().st_size / 1e6, 1) for name, path in paths.items()}
        readers = {
            "oscar_tsv_base64": (read_tsv, paths["tsv"]),
            "parquet_nested_pylist": (read_parquet_pylist, paths["nested"]),
            **{f"parquet_{layout}": (read_parquet_arrow, paths[layout]) for layout in LAYOUTS},
            "np_fromfile_raw": (read_raw, paths["raw"]),
            "raw_readinto_chunks": (read_raw_chunks, paths["raw"]),
        }
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(REPEATS):
            for name, (reader, path) in readers.items():
                start = time.perf_counter()
                assert reader(path) == ROWS
                times[name].append(time.perf_counter() - start)
    base = ROWS / median(times["oscar_tsv_base64"])
    raw = ROWS / median(times["np_fromfile_raw"])
    chunks = ROWS / median(times["raw_readinto_chunks"])
    results = {name: {"rows_per_s": round(ROWS / median(t), 1), "float32_MB_per_s": round(float_mb / median(t), 1),
                      "seconds": [round(x, 3) for x in t], "ratio_vs_tsv": round(ROWS / median(t) / base, 2),
                      "fraction_of_fromfile": round(ROWS / median(t) / raw, 3),
                      "fraction_of_readinto": round(ROWS / median(t) / chunks, 3)} for name, t in times.items()}
    print_table(["reader", "rows/s", "MB/s (float32)", "ratio vs Oscar TSV", "of np.fromfile", "of readinto"],
                [[n, r["rows_per_s"], r["float32_MB_per_s"], r["ratio_vs_tsv"], r["fraction_of_fromfile"],
                  r["fraction_of_readinto"]] for n, r in results.items()])
    print(f"files: {sizes}")
    settings = {"rows": ROWS, "regions_per_row": REGIONS, "repeats": REPEATS, "float32_MB": round(float_mb, 1), **sizes}
    print(write_results(SCRIPT, torch.device("cpu"), commit, settings, results))


if __name__ == "__main__":
    main()
