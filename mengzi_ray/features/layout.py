"""The two storage layouts of a region-feature dataset's `features` column, and the one reader for both.

- `nested` (FEATURES_SCHEMA): list<fixed_size_list<float32, D>>, one list of D-vectors per image. Any Arrow tool
  sees floats, but Parquet stores a repetition and a definition level for every float, and decoding those levels
  caps reads at a few hundred MB/s.
- `packed`: one large_binary cell per image holding its N x D matrix as little-endian float32 (or, opt-in and lossy,
  float16) bytes, row-major, the same bytes the VinVL TSV base64-encodes. Parquet stores such a cell as one plain
  byte array, so a read is a copy of the bytes, and numpy views them without another copy (float16 is upcast to
  float32 once per batch). The field carries its layout as metadata (`FEATURES_META_KEY`: JSON {"layout",
  "dtype", "dim"}), which Parquet keeps in the file and Ray Data keeps through its blocks.

Writers choose with `to_layout` and `write_features` / `parquet_options` (the extract card's `feature_layout`); readers call
`region_arrays_of(table)` and `features_dim(schema)`, which accept both layouts, so datasets of either kind (and
datasets written before packed existed) read the same everywhere.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray.features.schema import FEATURES_SCHEMA, REGION_DIM, region_arrays

Layout = Literal["nested", "packed", "packed_float16"]
LAYOUTS: tuple[str, ...] = ("nested", "packed", "packed_float16")
FEATURES_META_KEY = b"mengzi.features"
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# Row groups of about this many bytes: big enough for long sequential reads, small enough to stream (a reader
# holds one row group of one column at a time).
ROW_GROUP_BYTES = 64 << 20


def packed_field(dtype: str = "float32", dim: int = REGION_DIM) -> pa.Field:
    """The `features` field of the packed layout (see module docstring)."""
    if dtype not in _DTYPES:
        raise ValueError(f"packed features dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    meta = json.dumps({"layout": "packed", "dtype": dtype, "dim": dim})
    return pa.field("features", pa.large_binary(), metadata={FEATURES_META_KEY: meta.encode()})


def packed_schema(dtype: str = "float32", dim: int = REGION_DIM) -> pa.Schema:
    """FEATURES_SCHEMA with the packed `features` field."""
    index = FEATURES_SCHEMA.get_field_index("features")
    return FEATURES_SCHEMA.set(index, packed_field(dtype, dim))


def packed_format(field: pa.Field) -> tuple[np.dtype, int] | None:
    """(numpy dtype, D) of a packed `features` field; None for the nested layout. ValueError for a binary field
    without the layout metadata (its bytes cannot be read without knowing dtype and D)."""
    if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
        return None
    if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
        raise ValueError(f"`features` must be list<fixed_size_list<float32, D>> or packed binary, got {field.type}")
    raw = (field.metadata or {}).get(FEATURES_META_KEY)
    if raw is None:
        raise ValueError(f"`features` is binary but has no {FEATURES_META_KEY.decode()} metadata (dtype, dim)")
    meta = json.loads(raw)
    if meta.get("dtype") not in _DTYPES or int(meta.get("dim", 0)) <= 0:
        raise ValueError(f"`features` metadata {meta} must give dtype in {sorted(_DTYPES)} and a positive dim")
    return _DTYPES[meta["dtype"]], int(meta["dim"])


def features_dim(schema: pa.Schema) -> int:
    """D of the `features` column of either layout, from the schema alone."""
    if "features" not in schema.names:
        raise ValueError("no `features` column")
    field = schema.field("features")
    packed = packed_format(field)
    if packed is not None:
        return packed[1]
    region = field.type.value_type
    if not pa.types.is_fixed_size_list(region):
        raise ValueError(f"`features` must be list<fixed_size_list<float32, D>>, got {field.type}")
    return region.list_size


def region_arrays_of(table: pa.Table | pa.RecordBatch) -> list[np.ndarray]:
    """One (N_i, D) float32 array per row of `table`'s `features` column, either layout: read-only views of the
    Arrow buffers for nested and packed float32, one float32 copy per chunk for packed float16."""
    field = table.schema.field("features")
    packed = packed_format(field)
    column = table.column("features")
    if packed is None:
        return region_arrays(column)
    dtype, dim = packed
    row_bytes = dim * dtype.itemsize
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError(f"packed `features`: {chunk.null_count} null cells")
        _, offsets_buf, values_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        if np.any((offsets - offsets[0]) % row_bytes):
            raise ValueError(f"packed `features`: a cell's size is not a multiple of {dim} x {dtype.name}")
        start, end = int(offsets[0]), int(offsets[-1])
        flat = np.frombuffer(values_buf, np.uint8)[start:end].view(dtype)
        if dtype != np.float32:
            flat = flat.astype(np.float32)
        matrix = flat.reshape(-1, dim)
        matrix.setflags(write=False)  # views of Arrow's buffer: the same contract as the nested reader
        rows = (offsets - start) // row_bytes
        out.extend(matrix[rows[i] : rows[i + 1]] for i in range(len(chunk)))
    return out


def pack_features(table: pa.Table, dtype: str = "float32") -> pa.Table:
    """A nested-layout table → the packed layout; other columns unchanged. float16 rounds every value (lossy) and
    refuses values beyond its range (±65504) instead of storing them as inf."""
    field = table.schema.field("features")
    if packed_format(field) is not None:
        raise ValueError("`features` is already packed")
    out_field = packed_field(dtype, features_dim(table.schema))  # raises for an unknown dtype
    cells = []
    for image_id, matrix in zip(table.column("image_id").to_pylist(), region_arrays_of(table)):
        stored = np.ascontiguousarray(matrix, dtype=_DTYPES[dtype])
        if dtype == "float16" and not np.isfinite(stored).all() and np.isfinite(matrix).all():
            raise ValueError(f"{image_id}: region features exceed the float16 range; store them as float32")
        cells.append(stored.tobytes())
    index = table.schema.get_field_index("features")
    return table.set_column(index, out_field, pa.array(cells, pa.large_binary()))


def to_layout(table: pa.Table, layout: Layout) -> pa.Table:
    """A nested-layout table in `layout` (nested: as it is)."""
    if layout not in LAYOUTS:
        raise ValueError(f"feature layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "nested":
        return table
    return pack_features(table, "float16" if layout == "packed_float16" else "float32")


def parquet_options(schema: pa.Schema, bytes_per_row: int | None = None) -> dict:
    """pyarrow.parquet write options for a feature table of either layout: no compression and no dictionary or
    statistics on the feature column (float noise does not compress, and min/max statistics of 400 KB cells would
    bloat the footer); with `bytes_per_row`, row groups of about ROW_GROUP_BYTES."""
    others = [name for name in schema.names if name != "features"]
    options: dict = {
        "compression": {name: ("none" if name == "features" else "snappy") for name in schema.names},
        "use_dictionary": [n for n in others if pa.types.is_string(schema.field(n).type)],
        "write_statistics": others,
    }
    if bytes_per_row:
        options["row_group_size"] = max(1, ROW_GROUP_BYTES // bytes_per_row)
    return options


def write_features(table: pa.Table, where: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write one feature Parquet file (either layout) with `parquet_options`."""
    options = parquet_options(table.schema, max(1, table.nbytes // max(1, table.num_rows)))
    pq.write_table(table, where, filesystem=filesystem, **options)
